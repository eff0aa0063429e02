// tracker dashboard: plain JavaScript, no build step. One vendored library: uPlot (the throughput chart).
//
// Three views on one page, each with its own address: the session list (/dashboard), one session
// (/dashboard/sessions/{id}?status=failed&q=...&sort=...&node=...) and the workers
// (/dashboard/workers). The list is read from GET /sessions every few seconds (that is how new
// sessions appear); sessions still going, at most MAX_STREAMS of them (the open one first), are
// followed live through their Server-Sent Events stream (browsers open ~6 connections per host over
// HTTP/1.1, hence the cap). An open session's nodes are all read once, then kept current by its
// stream's node events: the node map, the node table's filters, search and sorting work on that copy.
// Every value shown comes from the API and is written with textContent, never as HTML.
"use strict";

(() => {
  const API = new URL("api/v1/parallel/", document.baseURI);
  const BASE_PATH = new URL(document.baseURI).pathname;
  const STATE_URL = new URL("dashboard/state", document.baseURI);
  const LOGIN_URL = new URL("dashboard/login", document.baseURI);
  const LOGOUT_URL = new URL("dashboard/logout", document.baseURI);
  const REFRESH_MS = Math.max(0.5, Number(new URLSearchParams(window.location.search).get("refresh")) || 2) * 1000;
  const MAX_STREAMS = 4;
  const PAGE = 50;
  const NODE_PAGE = 100;
  const MAX_NODES = 100000;
  const TERMINAL = new Set(["completed", "partial_failure", "failed", "cancelled"]);
  const ENDED_RESUMABLE = new Set(["partial_failure", "failed", "cancelled"]);
  const EVENT_TYPES = ["created", "status", "progress", "node", "reset", "added", "child"];
  // Stacked-bar order: what is over, then what is going, then what has not started.
  const NODE_STATUSES = ["completed", "failed", "skipped", "lost", "cancelled", "running", "retrying", "pending"];
  const STATUS_RANK = Object.fromEntries(NODE_STATUSES.map((status, i) => [status, i]));
  const COUNT_FIELD = {
    completed: "completed_nodes", failed: "failed_nodes", skipped: "skipped_nodes", lost: "lost_nodes",
    cancelled: "cancelled_nodes", running: "running_nodes", retrying: "retrying_nodes", pending: "pending_nodes",
  };
  const css = getComputedStyle(document.documentElement);
  const COLOUR = Object.fromEntries(NODE_STATUSES.map((status) => [status, css.getPropertyValue(`--${status}`).trim()]));
  const collator = new Intl.Collator(undefined, { numeric: true });
  const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

  const state = {
    view: null, // "sessions" | "workers" | "session"
    sessions: new Map(), // task_id -> ParallelTaskStatus (merged with live events)
    rows: new Map(), // task_id -> <tr> of the list
    listShown: 0, // sessions the list shows (a refresh reads at least that many again)
    listGeneration: 0, // moves on "More" and filter changes: older list reads are dropped
    nextCursor: null,
    streams: new Map(), // task_id -> EventSource
    lastIds: new Map(), // task_id -> last event id seen (for a manual reconnect)
    retrying: new Map(), // task_id -> Set of node ids whose latest event seen here is "retrying"
    selected: null,
    nodes: new Map(), // node_id -> NodeResult of the open session
    nodeCounts: Object.fromEntries(NODE_STATUSES.map((s) => [s, 0])), // of those nodes, by status
    order: [], // node ids in map order (sorted once, later ones appended)
    nodesLoaded: false,
    nodesLoading: false,
    pendingEvents: [], // node events that came while the nodes were being read
    nodeOffset: 0,
    sort: { key: "node_id", dir: 1 },
    layout: null, // the open session's JSON Canvas layout, when the server can read its file
    mapMode: "grid",
    tokenRequired: false,
    loggedIn: false,
    needLogin: false,
    token: null, // typed into a confirmation; kept for this page's life only
    lastOk: null,
    offline: false,
    eventsApplied: 0, // stream events applied to the page (tells live updates from list refreshes)
  };
  window.trackerDashboard = state; // for curious people with a console (and for tests)

  const $ = (id) => document.getElementById(id);

  class AuthRequired extends Error {}
  class Offline extends Error {}

  // -- talking to the server ------------------------------------------------------------------

  // `own`: the request carries the token typed into a confirmation; its 401 means a wrong token there.
  async function request(url, init, own) {
    let response;
    try {
      response = await fetch(url, { credentials: "same-origin", ...init });
    } catch (error) {
      throw markOffline("the server cannot be reached");
    }
    if (response.status === 401 && !own) {
      showLogin();
      throw new AuthRequired("login needed");
    }
    if (response.status >= 500) {
      throw markOffline(response.status === 503 ? "the server cannot reach its store" : `server error ${response.status}`);
    }
    markOnline();
    return response;
  }

  async function api(path, params, init) {
    const url = new URL(path, API);
    for (const [key, value] of Object.entries(params || {})) {
      const values = Array.isArray(value) ? value : [value];
      for (const one of values) if (one !== null && one !== undefined && one !== "") url.searchParams.append(key, one);
    }
    const response = await request(url, { headers: { Accept: "application/json" }, ...init }, Boolean(init?.headers?.Authorization));
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = new Error(detailOf(body, response));
      error.status = response.status;
      throw error;
    }
    return body;
  }

  function detailOf(body, response) {
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail) && body.detail[0]?.msg) return body.detail[0].msg;
    return `error ${response.status}`;
  }

  function quietly(promise) {
    return promise.catch((error) => {
      if (!(error instanceof AuthRequired) && !(error instanceof Offline)) setConnection(error.message, true);
    });
  }

  function markOffline(reason) {
    state.offline = true;
    $("offline").hidden = false;
    $("offline-reason").textContent = `${reason}.`;
    $("main").classList.add("stale");
    setConnection("offline", true);
    tick();
    return new Offline(reason);
  }

  function markOnline() {
    state.lastOk = Date.now();
    if (!state.offline) return;
    state.offline = false;
    $("offline").hidden = true;
    $("main").classList.remove("stale");
    showStreams();
  }

  function setConnection(text, isError) {
    const node = $("connection");
    node.textContent = text;
    node.className = isError ? "error" : "";
  }

  function showStreams() {
    if (!state.offline) setConnection(`live · ${state.streams.size} stream${state.streams.size === 1 ? "" : "s"}`, false);
  }

  // -- small rendering helpers ----------------------------------------------------------------

  function el(tag, value, className) {
    const node = document.createElement(tag);
    if (value !== null && value !== undefined) node.textContent = String(value);
    if (className) node.className = className;
    return node;
  }

  function wrap(tag, ...children) {
    const node = document.createElement(tag);
    node.append(...children);
    return node;
  }

  function statusBadge(status) {
    return el("span", status, `status status-${status}`);
  }

  function link(href, label) {
    const a = el("a", label);
    a.href = href;
    return a;
  }

  function sessionHref(id, query) {
    return `dashboard/sessions/${id}${query ? `?${query}` : ""}`;
  }

  function when(iso) {
    return iso ? dateFormat.format(new Date(iso)) : "—";
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function counts(session) {
    const out = {};
    for (const status of NODE_STATUSES) out[status] = Math.max(0, Number(session[COUNT_FIELD[status]] || 0));
    // Pending is what the other counts leave, so that the bar always sums to the session's nodes.
    const others = NODE_STATUSES.filter((s) => s !== "pending").reduce((sum, s) => sum + out[s], 0);
    out.pending = Math.max(0, session.node_count - others);
    return out;
  }

  function fillStack(bar, session) {
    const parts = counts(session);
    const total = Math.max(1, session.node_count);
    if (bar.children.length !== NODE_STATUSES.length) {
      bar.replaceChildren(...NODE_STATUSES.map((status) => el("span", null, `seg-${status}`)));
    }
    NODE_STATUSES.forEach((status, i) => {
      bar.children[i].style.width = `${(100 * parts[status]) / total}%`;
    });
    const label = NODE_STATUSES.filter((s) => parts[s]).map((s) => `${parts[s]} ${s}`).join(", ");
    bar.setAttribute("aria-label", `${session.node_count} nodes: ${label || "none"}`);
    bar.title = label;
    return parts;
  }

  function pace(session) {
    const parts = [];
    if (session.rate_per_s) parts.push(`${session.rate_per_s.toFixed(session.rate_per_s < 10 ? 1 : 0)}/s`);
    const eta = etaSeconds(session);
    if (eta !== null && !TERMINAL.has(session.status)) parts.push(`ETA ${duration(eta)}`);
    return parts.join(", ");
  }

  function etaSeconds(session) {
    if (TERMINAL.has(session.status)) return 0;
    if (!session.eta_at) return null;
    const left = (new Date(session.eta_at).getTime() - Date.now()) / 1000;
    return left >= 0 ? left : null;
  }

  function elapsed(session) {
    const start = session.started_at || session.created_at;
    const end = session.finished_at ? new Date(session.finished_at).getTime() : Date.now();
    return start ? (end - new Date(start).getTime()) / 1000 : null;
  }

  // -- views and addresses --------------------------------------------------------------------

  function route() {
    const path = window.location.pathname.startsWith(BASE_PATH) ? window.location.pathname.slice(BASE_PATH.length) : "";
    const match = path.match(/^dashboard\/sessions\/([0-9a-fA-F-]{32,36})\/?$/);
    closeNodeDetail(false);
    if (match) openSession(match[1].toLowerCase());
    else if (/^dashboard\/workers\/?$/.test(path)) showView("workers");
    else showView("sessions");
  }

  function navigate(href) {
    window.history.pushState(null, "", new URL(href, document.baseURI));
    route();
    $("main").focus({ preventScroll: false });
    window.scrollTo(0, 0);
  }

  function showView(view) {
    state.view = view;
    $("sessions-view").hidden = view !== "sessions";
    $("workers-view").hidden = view !== "workers";
    $("detail").hidden = view !== "session";
    const current = view === "workers" ? $("nav-workers") : $("nav-sessions");
    for (const a of [$("nav-sessions"), $("nav-workers")]) {
      if (a === current) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    if (view !== "session") {
      state.selected = null;
      document.title = view === "workers" ? "Workers · tracker" : "Sessions · tracker";
    }
    if (view === "sessions") {
      readListFilters();
      quietly(refreshSessions());
    }
    if (view === "workers") quietly(refreshWorkers());
    followStreams();
  }

  // Links inside the page change the view without loading the page again.
  document.addEventListener("click", (event) => {
    const a = event.target.closest("a[href]");
    if (!a || event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) return;
    const url = new URL(a.href, document.baseURI);
    if (url.origin !== window.location.origin || !url.pathname.startsWith(`${BASE_PATH}dashboard`)) return;
    if (a.closest("#nodes") || a.closest("#failures")) return; // handled below (node links)
    event.preventDefault();
    navigate(url.pathname.slice(BASE_PATH.length) + url.search);
  });
  window.addEventListener("popstate", route);

  // -- the session list -----------------------------------------------------------------------

  function listFilters() {
    return { status: $("status-filter").value, tag: $("tag-filter").value.trim(), path: $("path-filter").value };
  }

  // A `?refresh=` given to the page stays in its address as the view's own parameters change.
  function keepRefresh(query) {
    const refresh = new URLSearchParams(window.location.search).get("refresh");
    if (refresh) query.set("refresh", refresh);
  }

  function readListFilters() {
    const query = new URLSearchParams(window.location.search);
    $("status-filter").value = query.get("status") || "";
    $("tag-filter").value = query.get("tag") || "";
    $("path-filter").value = query.get("path") || "";
  }

  function writeListFilters() {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(listFilters())) if (value) query.set(key, value);
    keepRefresh(query);
    window.history.replaceState(null, "", `${BASE_PATH}dashboard${query.size ? `?${query}` : ""}`);
  }

  // Reads the list from its start until it holds `want` sessions (a status filter sifts the API's
  // pages, so a page may hold fewer) or the sessions run out.
  async function readSessions(want, cursor) {
    const filters = listFilters();
    const found = [];
    let next = cursor;
    for (let reads = 0; reads < 40; reads += 1) {
      const page = await api("sessions", { ...filters, limit: Math.min(1000, Math.max(PAGE, want - found.length)), cursor: next });
      found.push(...page.sessions);
      next = page.next_cursor;
      if (next === null || found.length >= want) break;
    }
    // A full page always has a cursor, even when nothing follows it: look, so that "More" shows
    // only when there is more.
    if (next !== null) {
      const after = await api("sessions", { ...filters, limit: 1, cursor: next });
      if (!after.sessions.length && after.next_cursor === null) next = null;
    }
    return { found, next };
  }

  async function refreshSessions() {
    if (state.needLogin || state.view !== "sessions") return;
    const asked = JSON.stringify(listFilters());
    const generation = state.listGeneration;
    const { found, next } = await readSessions(Math.max(PAGE, state.listShown), null);
    // A "More" or a filter change since this read began makes it out of date: drop it.
    if (state.view !== "sessions" || asked !== JSON.stringify(listFilters()) || generation !== state.listGeneration) return;
    showSessions(found, next, false);
  }

  async function moreSessions() {
    if (state.nextCursor === null) return;
    state.listGeneration += 1;
    const { found, next } = await readSessions(PAGE, state.nextCursor);
    state.listGeneration += 1;
    showSessions(found, next, true);
  }

  function showSessions(found, next, append) {
    const body = document.querySelector("#sessions tbody");
    const keep = append ? [...body.children] : [];
    const seen = new Set(keep.map((row) => row.dataset.sessionId));
    const rows = [...keep];
    for (const session of found) {
      if (seen.has(session.task_id)) continue;
      seen.add(session.task_id);
      state.sessions.set(session.task_id, mergeLive(session));
      rows.push(renderRow(state.sessions.get(session.task_id)));
    }
    // Rows that left the list (another status now, removed, filtered out) go.
    for (const [id, row] of state.rows) {
      if (!seen.has(id)) {
        row.remove();
        state.rows.delete(id);
      }
    }
    rows.forEach((row, i) => {
      if (body.children[i] !== row) body.insertBefore(row, body.children[i] || null);
    });
    state.listShown = rows.length;
    state.nextCursor = next;
    $("sessions-more").hidden = next === null;
    $("sessions-empty").hidden = rows.length > 0;
    followStreams();
  }

  // A listing read can be older than the events a stream already applied: keep the newer one.
  function mergeLive(session) {
    const known = state.sessions.get(session.task_id);
    if (known && state.streams.has(session.task_id) && known.updated_at > session.updated_at) return known;
    return session;
  }

  function renderRow(session) {
    let row = state.rows.get(session.task_id);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.sessionId = session.task_id;
      const name = wrap("td", link(sessionHref(session.task_id), ""), el("code", session.task_id.slice(0, 8), "sub"));
      name.className = "name";
      const progress = wrap("td", wrap("div"), el("span", "", "label"));
      progress.className = "progress-cell";
      progress.firstChild.className = "stack mini";
      progress.firstChild.setAttribute("role", "progressbar");
      progress.firstChild.setAttribute("aria-valuemin", "0");
      progress.firstChild.setAttribute("aria-valuemax", "100");
      row.append(name, el("td", "", "status-cell"), progress, el("td", "", "counts"), el("td", "", "updated"));
      row.addEventListener("click", (event) => {
        if (!event.target.closest("a")) navigate(sessionHref(session.task_id));
      });
      state.rows.set(session.task_id, row);
    }
    row.querySelector(".name a").textContent = session.canvas_path;
    row.querySelector(".name code").title = session.task_id;
    row.querySelector(".status-cell").replaceChildren(statusBadge(session.status));
    const bar = row.querySelector(".stack");
    fillStack(bar, session);
    bar.setAttribute("aria-valuenow", String(Math.round(Number(session.progress_percent) * 10) / 10));
    bar.setAttribute("aria-valuetext", `${session.progress_percent} %`);
    const extra = pace(session);
    row.querySelector(".progress-cell .label").textContent =
      `${Math.round(Number(session.progress_percent) * 10) / 10} %${extra ? ` · ${extra}` : ""}`;
    row.querySelector(".counts").textContent =
      `${session.completed_nodes} / ${session.failed_nodes} / ${session.running_nodes} / ${counts(session).pending}` +
      ` of ${session.node_count}`;
    row.querySelector(".counts").title = "completed / failed / running / pending of all nodes";
    row.querySelector(".updated").textContent = when(session.updated_at);
    return row;
  }

  // -- live streams ---------------------------------------------------------------------------

  function followStreams() {
    const wanted = [];
    if (state.view === "session" && state.selected && !TERMINAL.has(state.sessions.get(state.selected)?.status)) {
      wanted.push(state.selected);
    }
    if (state.view === "sessions") {
      for (const row of document.querySelectorAll("#sessions tbody tr")) {
        if (wanted.length >= MAX_STREAMS) break;
        const id = row.dataset.sessionId;
        const session = state.sessions.get(id);
        if (session && !TERMINAL.has(session.status) && !wanted.includes(id)) wanted.push(id);
      }
    }
    for (const [id, stream] of state.streams) {
      if (!wanted.includes(id)) {
        stream.close();
        state.streams.delete(id);
      }
    }
    for (const id of wanted) if (!state.streams.has(id)) openStream(id);
    showStreams();
  }

  function closeStreams() {
    for (const stream of state.streams.values()) stream.close();
    state.streams.clear();
    showStreams();
  }

  function openStream(id) {
    const url = new URL(`sessions/${id}/events`, API);
    if (state.lastIds.has(id)) url.searchParams.set("last_event_id", state.lastIds.get(id));
    const stream = new EventSource(url);
    state.streams.set(id, stream);
    const remember = (event) => {
      if (event.lastEventId) state.lastIds.set(id, event.lastEventId);
    };
    stream.addEventListener("open", markOnline);
    stream.addEventListener("snapshot", (event) => {
      remember(event);
      update(JSON.parse(event.data));
      // A snapshot also comes after a gap (this page fell behind the stream's cap): read the
      // nodes again, since some of their events were never received.
      if (state.selected === id && !state.nodesLoading) quietly(loadAllNodes(id));
    });
    for (const type of EVENT_TYPES) {
      stream.addEventListener(type, (event) => {
        remember(event);
        applyEvent(id, JSON.parse(event.data));
      });
    }
    stream.addEventListener("end", (event) => {
      stream.close();
      state.streams.delete(id);
      showStreams();
      if (JSON.parse(event.data).reason === "not_found") sessionGone(id);
      else quietly(refreshOne(id));
    });
    stream.addEventListener("error", () => {
      // A dropped connection is retried by the browser itself (with Last-Event-ID). A refused one
      // (401, 404, 503) closes the stream: the next refresh opens it again if still wanted.
      if (stream.readyState === EventSource.CLOSED && state.streams.get(id) === stream) {
        state.streams.delete(id);
        showStreams();
      }
    });
  }

  // Drawn once per frame at most, however many events came: a busy session sends thousands a second.
  const redraw = new Set();
  function update(session) {
    state.sessions.set(session.task_id, session);
    redraw.add(session.task_id);
    scheduleFrame();
  }

  function drawUpdates() {
    for (const id of redraw) {
      const session = state.sessions.get(id);
      if (!session) continue;
      if (state.rows.has(id)) renderRow(session);
      if (state.selected === id) renderSession();
    }
    redraw.clear();
  }

  function applyEvent(id, event) {
    const session = state.sessions.get(id);
    if (!session) return;
    state.eventsApplied += 1;
    const merged = {
      ...session,
      status: event.status,
      progress_percent: event.progress_percent,
      completed_nodes: event.completed_nodes,
      failed_nodes: event.failed_nodes,
      updated_at: event.at,
    };
    if (event.type === "node" && event.node_status) {
      if (state.selected === id) nodeEvent(event);
      // The open session's counts come from its nodes; the others' are estimated from the event
      // until the next read makes them exact.
      Object.assign(merged, state.selected === id && state.nodesLoaded ? countNodes() : estimate(id, session, merged, event));
    }
    if (event.type === "child" && state.selected === id) scheduleChildren();
    if (["reset", "added", "status"].includes(event.type) && state.selected === id) {
      scheduleRefreshOne(id);
    }
    update(merged);
  }

  // The running, retrying and skipped counts are not in a node event. A skipped node never
  // started: it leaves pending, not running. A node waiting for Celery's retry is counted apart
  // from running until its next attempt starts or it ends; the nodes seen entering retrying here
  // are remembered, so that their next event takes them out of retrying rather than out of running.
  function estimate(id, session, merged, event) {
    if (!state.retrying.has(id)) state.retrying.set(id, new Set());
    const waiting = state.retrying.get(id);
    let running = session.running_nodes;
    let retrying = session.retrying_nodes || 0;
    if (waiting.delete(event.node_id)) retrying -= 1;
    else if (["retrying", "completed", "failed", "lost", "cancelled"].includes(event.node_status)) running -= 1;
    if (event.node_status === "running") running += 1;
    if (event.node_status === "retrying") {
      retrying += 1;
      waiting.add(event.node_id);
    }
    const out = {
      running_nodes: Math.min(Math.max(0, running), session.node_count),
      retrying_nodes: Math.min(Math.max(0, retrying), session.node_count),
    };
    if (event.node_status === "skipped") {
      out.skipped_nodes = Math.min((session.skipped_nodes || 0) + 1,
        Math.max(0, session.node_count - merged.completed_nodes - merged.failed_nodes - merged.cancelled_nodes));
    }
    return out;
  }

  async function refreshOne(id) {
    update(await api(`status/${id}`));
    if (state.selected === id && !state.nodesLoaded && !state.nodesLoading) await loadAllNodes(id);
    followStreams();
  }

  let refreshOneTimer = null;
  function scheduleRefreshOne(id) {
    clearTimeout(refreshOneTimer);
    refreshOneTimer = setTimeout(() => quietly(refreshOne(id)), 300);
  }

  // -- one session ----------------------------------------------------------------------------

  function openSession(id) {
    const switching = state.selected !== id;
    state.view = "session";
    showView("session");
    state.selected = id;
    if (switching) {
      state.nodes = new Map();
      state.order = [];
      state.nodesLoaded = false;
      state.nodesLoading = false;
      state.pendingEvents = [];
      state.layout = null;
      state.mapMode = "grid";
      state.chart = null;
      state.failuresSeen = null;
      state.childrenSeen = null;
      $("chart").replaceChildren();
      $("map-mode").hidden = true;
      $("failures").hidden = true;
      $("children").hidden = true;
      $("detail-missing").hidden = true;
      $("detail").classList.remove("stale");
      document.querySelector("#nodes tbody").replaceChildren();
      document.querySelector("#failures tbody").replaceChildren();
    }
    readNodeQuery();
    $("detail-id").textContent = id;
    if (state.sessions.has(id)) renderSession();
    quietly(refreshOne(id).catch((error) => {
      if (error.status === 404 || error.status === 422) {
        showMissing(id, `No session ${id} here: it never existed, or it expired and was removed.`);
        return;
      }
      throw error;
    }));
    quietly(loadLayout(id));
    followStreams();
    const node = new URLSearchParams(window.location.search).get("node");
    if (node) quietly(openNodeDetail(node, false));
  }

  function renderSession() {
    const session = state.sessions.get(state.selected);
    if (!session) return;
    document.title = `${session.status} · ${session.canvas_path} · tracker`;
    $("detail-canvas").textContent = session.canvas_path;
    $("detail-status").replaceChildren(statusBadge(session.status));
    $("detail-id").textContent = session.task_id;
    const parent = $("detail-parent");
    parent.replaceChildren();
    if (session.parent_session_id) {
      parent.append("· child of ", link(sessionHref(session.parent_session_id), session.parent_session_id.slice(0, 8)),
        ` (node ${session.parent_node_id})`);
    }
    $("detail-tags").textContent = session.tags && session.tags.length ? `· tags: ${session.tags.join(", ")}` : "";
    // The server decides when a session looks stuck (GET status and the listing carry its hint);
    // the first node event makes it running, and the hint is then over whatever it said.
    const hint = $("detail-hint");
    hint.textContent = session.hint || "";
    hint.hidden = !(session.hint && session.status === "pending");

    const parts = fillStack($("stack"), session);
    const legend = $("legend");
    if (legend.children.length !== NODE_STATUSES.length) {
      legend.replaceChildren(...NODE_STATUSES.map((status) => {
        const item = wrap("li", el("span", null, `swatch seg-${status}`), el("span", status, "name"),
          el("strong", "0", `count count-${status}`));
        item.dataset.status = status;
        return item;
      }));
    }
    for (const status of NODE_STATUSES) {
      legend.querySelector(`li[data-status="${status}"] .count`).textContent = String(parts[status]);
    }
    renderFigures(session);
    renderActions(session);
    // Failures and children are read again only when what they show may have changed.
    const failures = `${session.failed_nodes}/${session.lost_nodes}/${session.failure_types}/${session.status}`;
    if (failures !== state.failuresSeen) {
      state.failuresSeen = failures;
      if (session.failure_types || session.failed_nodes || session.lost_nodes) scheduleFailures();
      else $("failures").hidden = true;
    }
    const children = `${session.children}/${session.children_open}/${session.updated_at}`;
    if (session.children && children !== state.childrenSeen) scheduleChildren();
    if (!session.children) $("children").hidden = true;
    state.childrenSeen = children;
  }

  function renderFigures(session) {
    const figures = [
      ["progress", `${Math.round(Number(session.progress_percent) * 10) / 10} %`],
      ["nodes", String(session.node_count)],
      ["rate", session.rate_per_s ? `${session.rate_per_s.toFixed(1)} nodes/s` : "—"],
      ["ETA", TERMINAL.has(session.status) ? "ended" : duration(etaSeconds(session))],
      ["elapsed", duration(elapsed(session))],
      ["created", when(session.created_at)],
      ["finished", when(session.finished_at)],
      ["updated", when(session.updated_at)],
    ];
    const list = $("figures");
    if (list.children.length !== figures.length) {
      list.replaceChildren(...figures.map(([label]) => {
        const item = wrap("div", el("dt", label), el("dd", ""));
        item.dataset.figure = label;
        return item;
      }));
    }
    for (const [label, value] of figures) list.querySelector(`[data-figure="${label}"] dd`).textContent = value;
  }

  // A session the store no longer has (removed, or expired): what is shown of it is its last known
  // state, greyed, and nothing can be done with it.
  function sessionGone(id) {
    const session = state.sessions.get(id);
    if (session) state.sessions.set(id, { ...session, gone: true });
    if (state.rows.has(id)) {
      state.rows.get(id).remove();
      state.rows.delete(id);
    }
    showMissing(id, `Session ${id} was removed (deleted, or expired): what is shown is its last known state.`);
  }

  function showMissing(id, text) {
    if (state.selected !== id) return;
    $("detail-missing").textContent = text;
    $("detail-missing").hidden = false;
    $("detail").classList.add("stale");
    renderActions({ status: "removed" });
  }

  function renderActions(session) {
    // (a server without TRACKER_API_TOKEN refuses every action: none is offered)
    const here = state.tokenRequired && session.status !== "removed" && !session.gone;
    const going = here && !TERMINAL.has(session.status);
    const resumable = here && ENDED_RESUMABLE.has(session.status);
    $("act-cancel").hidden = !going;
    $("act-terminate").hidden = !going;
    $("act-resume-failed").hidden = !resumable;
    $("act-resume-unfinished").hidden = !resumable;
  }

  // -- all nodes of the open session ----------------------------------------------------------

  async function loadAllNodes(id) {
    state.nodesLoading = true;
    state.nodesLoaded = false; // events from now on wait, then apply over what is read
    try {
      const nodes = new Map();
      let cursor = null;
      do {
        const page = await api(`sessions/${id}/nodes`, { limit: 1000, cursor });
        if (state.selected !== id) return;
        for (const node of page.nodes) nodes.set(node.node_id, node);
        cursor = page.next_cursor;
      } while (cursor !== null && nodes.size < MAX_NODES);
      state.nodes = nodes;
      state.order = [...nodes.keys()].sort(collator.compare);
      recount();
      state.nodesLoaded = true;
      // Events that came while reading are newer than (or as new as) what was read: apply them again.
      for (const event of state.pendingEvents.splice(0)) nodeEvent(event);
      $("map-note").textContent = cursor !== null ? `Showing the first ${MAX_NODES} nodes.` : "";
      const session = state.sessions.get(id);
      if (session && state.streams.has(id)) update({ ...session, ...countNodes() });
      drawMap(true);
      renderNodes();
      drawChart();
    } finally {
      if (state.selected === id) state.nodesLoading = false;
    }
  }

  // The open session's counts from its nodes (exact once they were read and every event applied),
  // kept as each event moves one node, so that an event costs the same with 20 nodes or 20,000.
  function recount() {
    state.nodeCounts = Object.fromEntries(NODE_STATUSES.map((s) => [s, 0]));
    for (const node of state.nodes.values()) state.nodeCounts[node.status] += 1;
  }

  function countNodes() {
    const out = {};
    for (const status of NODE_STATUSES) if (status !== "pending") out[COUNT_FIELD[status]] = state.nodeCounts[status];
    return out;
  }

  function nodeEvent(event) {
    if (!state.nodesLoaded) {
      state.pendingEvents.push(event);
      return;
    }
    let node = state.nodes.get(event.node_id);
    if (!node) {
      node = { node_id: event.node_id, status: "pending", attempts: 0 };
      state.nodeCounts.pending += 1;
      state.nodes.set(event.node_id, node);
      state.order.push(event.node_id);
      state.mapDirtyAll = true;
    } else {
      state.dirtyCells.add(event.node_id);
    }
    if (node.status !== event.node_status) {
      state.nodeCounts[node.status] -= 1;
      state.nodeCounts[event.node_status] += 1;
      node.status = event.node_status;
      // Until the node is read again, the event's time stands for its finish (the chart uses it).
      if (["completed", "failed", "lost", "cancelled", "skipped"].includes(event.node_status)) {
        node.finished_at = event.at;
        scheduleChart();
      }
    }
    state.changedNodes.add(event.node_id);
    scheduleFrame();
  }
  state.dirtyCells = new Set();
  state.changedNodes = new Set();

  let frameAsked = false;
  function scheduleFrame() {
    if (frameAsked) return;
    frameAsked = true;
    requestAnimationFrame(() => {
      frameAsked = false;
      drawUpdates();
      if (state.view === "session" && state.nodesLoaded) {
        drawMap(state.mapDirtyAll);
        scheduleNodeTable();
      }
    });
  }

  // -- the node map ---------------------------------------------------------------------------

  const map = { cell: 8, gap: 1, cols: 1, width: 0, height: 0, scale: 1, ox: 0, oy: 0, focus: -1 };
  window.trackerMap = map;

  function drawMap(all) {
    const canvas = $("node-map");
    const session = state.sessions.get(state.selected);
    if (!session || $("detail").hidden) return;
    const total = Math.max(session.node_count, state.order.length);
    const width = canvas.clientWidth;
    if (state.mapMode === "canvas" && state.layout) {
      drawLayout(canvas, width);
      state.dirtyCells.clear();
      state.mapDirtyAll = false;
      return;
    }
    // Cells as large as fit (2 to 24 px), rows wrapping at the map's width.
    let cell = Math.floor(Math.sqrt((width * 300) / Math.max(1, total)));
    cell = Math.max(2, Math.min(24, cell));
    const gap = cell >= 5 ? 1 : 0;
    const cols = Math.max(1, Math.floor(width / (cell + gap)));
    const height = Math.max(40, Math.ceil(total / cols) * (cell + gap));
    const ratio = window.devicePixelRatio || 1;
    const resized = map.width !== width || map.height !== height || map.cell !== cell || map.mode !== "grid";
    Object.assign(map, { cell, gap, cols, width, height, mode: "grid" });
    const ctx = canvas.getContext("2d");
    if (resized) {
      canvas.style.height = `${height}px`;
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
      all = true;
    }
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    const paint = (index, status) => {
      ctx.fillStyle = COLOUR[status] || COLOUR.pending;
      ctx.fillRect((index % cols) * (cell + gap), Math.floor(index / cols) * (cell + gap), cell, cell);
    };
    if (all) {
      ctx.clearRect(0, 0, width, height);
      // One fill colour at a time: a few thousand rectangles per colour, no DOM element per node.
      const byStatus = new Map(NODE_STATUSES.map((s) => [s, []]));
      state.order.forEach((id, i) => byStatus.get(state.nodes.get(id)?.status || "pending").push(i));
      for (let i = state.order.length; i < total; i += 1) byStatus.get("pending").push(i);
      for (const [status, cells] of byStatus) {
        ctx.fillStyle = COLOUR[status];
        for (const i of cells) ctx.fillRect((i % cols) * (cell + gap), Math.floor(i / cols) * (cell + gap), cell, cell);
      }
      state.positions = new Map(state.order.map((id, i) => [id, i]));
    } else {
      for (const id of state.dirtyCells) {
        const i = state.positions?.get(id);
        if (i !== undefined) paint(i, state.nodes.get(id).status);
      }
    }
    if (map.focus >= 0 && map.focus < total) {
      ctx.strokeStyle = "#111827";
      ctx.lineWidth = 2;
      ctx.strokeRect((map.focus % cols) * (cell + gap) - 1, Math.floor(map.focus / cols) * (cell + gap) - 1, cell + 2, cell + 2);
    }
    state.dirtyCells.clear();
    state.mapDirtyAll = false;
    canvas.setAttribute("aria-label", `Node map: ${$("stack").getAttribute("aria-label") || ""}. The node table below lists the same nodes.`);
  }

  function drawLayout(canvas, width) {
    const nodes = state.layout.nodes;
    let minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity;
    for (const n of nodes) {
      minX = Math.min(minX, n.x); minY = Math.min(minY, n.y);
      maxX = Math.max(maxX, n.x + n.width); maxY = Math.max(maxY, n.y + n.height);
    }
    const pad = 8;
    const spanX = Math.max(1, maxX - minX);
    const spanY = Math.max(1, maxY - minY);
    const scale = Math.min((width - 2 * pad) / spanX, 560 / spanY, 1.5);
    const height = Math.max(80, Math.ceil(spanY * scale + 2 * pad));
    const ratio = window.devicePixelRatio || 1;
    Object.assign(map, { mode: "canvas", scale, ox: pad - minX * scale, oy: pad - minY * scale, width, height });
    canvas.style.height = `${height}px`;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const box = (n) => [map.ox + n.x * scale, map.oy + n.y * scale, n.width * scale, n.height * scale];
    const byId = new Map(nodes.map((n) => [n.id, n]));
    ctx.strokeStyle = "#9ca3af";
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (const edge of state.layout.edges) {
      const a = byId.get(edge.from_node), b = byId.get(edge.to_node);
      if (!a || !b) continue;
      const [ax, ay, aw, ah] = box(a), [bx, by, bw, bh] = box(b);
      ctx.moveTo(ax + aw / 2, ay + ah / 2);
      ctx.lineTo(bx + bw / 2, by + bh / 2);
    }
    ctx.stroke();
    const font = Math.max(9, Math.min(14, 12 * scale * 2));
    ctx.font = `${font}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    for (const n of nodes) {
      const [x, y, w, h] = box(n);
      if (n.type === "group") {
        ctx.strokeStyle = "#6b7280";
        ctx.setLineDash([4, 3]);
        ctx.strokeRect(x, y, w, h);
        ctx.setLineDash([]);
        if (n.label) { ctx.fillStyle = "#374151"; ctx.fillText(n.label, x + 3, y + 3, w - 6); }
        continue;
      }
      const status = state.nodes.get(n.id)?.status || "pending";
      ctx.fillStyle = "#ffffff";
      ctx.fillRect(x, y, w, h);
      ctx.fillStyle = COLOUR[status];
      ctx.globalAlpha = 0.35;
      ctx.fillRect(x, y, w, h);
      ctx.globalAlpha = 1;
      ctx.strokeStyle = COLOUR[status];
      ctx.lineWidth = Math.max(2, 3 * scale);
      ctx.strokeRect(x, y, w, h);
      if (h > font + 4 && w > 24) {
        ctx.fillStyle = "#111827";
        ctx.fillText(n.label || n.id, x + 4, y + 4, w - 8);
        if (h > 2 * font + 8) ctx.fillText(status, x + 4, y + font + 6, w - 8);
      }
    }
  }

  function nodeAt(event) {
    const canvas = $("node-map");
    const rect = canvas.getBoundingClientRect();
    const x = event.clientX - rect.left, y = event.clientY - rect.top;
    if (map.mode === "canvas" && state.layout) {
      for (const n of state.layout.nodes) {
        if (n.type === "group") continue;
        const nx = map.ox + n.x * map.scale, ny = map.oy + n.y * map.scale;
        if (x >= nx && y >= ny && x <= nx + n.width * map.scale && y <= ny + n.height * map.scale) return n.id;
      }
      return null;
    }
    const col = Math.floor(x / (map.cell + map.gap)), row = Math.floor(y / (map.cell + map.gap));
    if (col >= map.cols) return null;
    return state.order[row * map.cols + col] ?? null;
  }

  function showTip(id, x, y) {
    const tip = $("map-tip");
    if (!id) {
      tip.hidden = true;
      return;
    }
    const node = state.nodes.get(id);
    const status = node?.status || "pending";
    const error = node?.error ? ` · ${node.error.type}` : "";
    tip.textContent = `${id} · ${status}${error}`;
    tip.hidden = false;
    tip.style.left = `${Math.min(x + 12, $("map-wrap").clientWidth - 160)}px`;
    tip.style.top = `${y + 12}px`;
  }

  $("node-map").addEventListener("mousemove", (event) => {
    const rect = $("node-map").getBoundingClientRect();
    showTip(nodeAt(event), event.clientX - rect.left, event.clientY - rect.top);
  });
  $("node-map").addEventListener("mouseleave", () => showTip(null));
  $("node-map").addEventListener("click", (event) => {
    const id = nodeAt(event);
    if (id) quietly(openNodeDetail(id, true));
  });
  // Keyboard: arrows move a focus cell through the grid, Enter opens its node.
  $("node-map").addEventListener("keydown", (event) => {
    if (map.mode !== "grid" || !state.order.length) return;
    const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: map.cols, ArrowUp: -map.cols }[event.key];
    if (step) {
      event.preventDefault();
      map.focus = Math.max(0, Math.min(state.order.length - 1, (map.focus < 0 ? 0 : map.focus + step)));
      drawMap(true);
      const id = state.order[map.focus];
      showTip(id, (map.focus % map.cols) * (map.cell + map.gap), Math.floor(map.focus / map.cols) * (map.cell + map.gap));
    } else if (event.key === "Enter" && map.focus >= 0) {
      quietly(openNodeDetail(state.order[map.focus], true));
    }
  });
  for (const button of document.querySelectorAll("#map-mode button")) {
    button.addEventListener("click", () => {
      state.mapMode = button.dataset.mode;
      for (const other of document.querySelectorAll("#map-mode button")) {
        other.setAttribute("aria-pressed", String(other === button));
      }
      drawMap(true);
    });
  }
  window.addEventListener("resize", () => {
    if (state.view === "session") drawMap(true);
    if (state.chart) state.chart.setSize({ width: $("chart").clientWidth, height: 200 });
  });

  async function loadLayout(id) {
    let layout;
    try {
      layout = await api(`sessions/${id}/canvas`);
    } catch (error) {
      if (error.status === 404) return; // no canvas file the server can read: the grid alone
      throw error;
    }
    if (state.selected !== id) return;
    state.layout = layout;
    state.mapMode = "canvas";
    $("map-mode").hidden = false;
    for (const button of document.querySelectorAll("#map-mode button")) {
      button.setAttribute("aria-pressed", String(button.dataset.mode === "canvas"));
    }
    drawMap(true);
  }

  // -- throughput -----------------------------------------------------------------------------

  let chartTimer = null;
  function scheduleChart() {
    if (chartTimer) return;
    chartTimer = setTimeout(() => {
      chartTimer = null;
      drawChart();
    }, 1000);
  }

  // Nodes finished per second, in up to 60 intervals from the first start to the last finish.
  function drawChart() {
    if (typeof window.uPlot !== "function" || state.view !== "session") return;
    const times = [];
    for (const node of state.nodes.values()) if (node.finished_at) times.push(new Date(node.finished_at).getTime() / 1000);
    if (!times.length) return;
    const session = state.sessions.get(state.selected);
    const start = Math.min(new Date(session?.started_at || session?.created_at || times[0] * 1000).getTime() / 1000, ...times);
    const end = Math.max(...times);
    const steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400];
    const step = steps.find((s) => (end - start) / s <= 60) || 86400;
    const first = Math.floor(start / step) * step;
    const buckets = new Array(Math.floor((end - first) / step) + 1).fill(0);
    for (const t of times) buckets[Math.floor((t - first) / step)] += 1;
    // An empty interval on each side: a batch that finished within one interval still draws a step.
    const xs = [first - step, ...buckets.map((_, i) => first + i * step), first + buckets.length * step];
    const ys = [0, ...buckets.map((count) => count / step), 0];
    const data = [xs, ys];
    if (!state.chart) {
      state.chart = new window.uPlot({
        width: Math.max(200, $("chart").clientWidth),
        height: 200,
        series: [{}, { label: "nodes/s", stroke: COLOUR.running, fill: "rgba(0, 114, 178, 0.15)", paths: window.uPlot.paths.stepped({ align: 1 }) }],
        axes: [{}, { label: "nodes/s" }],
        legend: { show: true },
      }, data, $("chart"));
    } else {
      state.chart.setData(data);
    }
  }

  // -- the node table -------------------------------------------------------------------------

  function readNodeQuery() {
    const query = new URLSearchParams(window.location.search);
    $("node-filter").value = query.get("status") || "";
    $("node-search").value = query.get("q") || "";
    const sort = query.get("sort") || "node_id";
    state.sort = { key: sort.replace(/^-/, ""), dir: sort.startsWith("-") ? -1 : 1 };
    state.nodeOffset = 0;
    showSort();
  }

  function writeNodeQuery(nodeId) {
    const query = new URLSearchParams();
    if ($("node-filter").value) query.set("status", $("node-filter").value);
    if ($("node-search").value) query.set("q", $("node-search").value);
    if (state.sort.key !== "node_id" || state.sort.dir !== 1) query.set("sort", `${state.sort.dir < 0 ? "-" : ""}${state.sort.key}`);
    const node = nodeId === undefined ? new URLSearchParams(window.location.search).get("node") : nodeId;
    if (node) query.set("node", node);
    keepRefresh(query);
    window.history.replaceState(null, "", `${BASE_PATH}${sessionHref(state.selected, query.toString())}`);
  }

  const SORT_KEYS = {
    node_id: (n) => n.node_id,
    status: (n) => STATUS_RANK[n.status] ?? 99,
    attempts: (n) => shownAttempts(n),
    worker: (n) => n.worker || "",
    time: (n) => n.execution_time_ms ?? -1,
    finished: (n) => n.finished_at || "",
  };

  function shownAttempts(node) {
    // A node cancelled or skipped before it ever started ran no attempt.
    return node.started_at ? node.attempts : 0;
  }

  function selectedNodes() {
    const filter = $("node-filter").value;
    const needle = $("node-search").value.trim().toLowerCase();
    const key = SORT_KEYS[state.sort.key] || SORT_KEYS.node_id;
    const dir = state.sort.dir;
    const out = [];
    for (const node of state.nodes.values()) {
      if (filter && node.status !== filter) continue;
      if (needle) {
        const hay = `${node.node_id} ${node.worker || ""} ${node.error ? `${node.error.type}: ${node.error.message}` : ""} ${node.reason || ""}`;
        if (!hay.toLowerCase().includes(needle)) continue;
      }
      out.push(node);
    }
    out.sort((a, b) => {
      const x = key(a), y = key(b);
      const order = typeof x === "number" && typeof y === "number" ? x - y : collator.compare(String(x), String(y));
      return order * dir || collator.compare(a.node_id, b.node_id);
    });
    return out;
  }

  // Live changes redraw the table at most every 400 ms, and only while it is on screen.
  let tableTimer = null;
  let tableOnScreen = true;
  new IntersectionObserver((entries) => {
    tableOnScreen = entries.some((entry) => entry.isIntersecting);
    if (tableOnScreen) scheduleNodeTable();
  }).observe($("nodes-panel"));

  function scheduleNodeTable() {
    if (tableTimer || !tableOnScreen) return;
    tableTimer = setTimeout(() => {
      tableTimer = null;
      renderNodes(true);
      refreshShownNodes();
    }, 400);
  }

  // The filtered, sorted node ids, kept while only statuses change under the default view (all
  // nodes by id): filtering and sorting 20,000 nodes on every change would cost whole frames.
  let tableIds = null;
  function tableNodes(live) {
    const plain = !$("node-filter").value && !$("node-search").value.trim() && state.sort.key === "node_id";
    if (!live || !plain || tableIds === null || tableIds.length !== state.nodes.size) {
      tableIds = selectedNodes().map((node) => node.node_id);
    }
    return tableIds.map((id) => state.nodes.get(id));
  }

  function renderNodes(live) {
    if (!state.nodesLoaded) return;
    const all = tableNodes(live);
    if (state.nodeOffset >= all.length) state.nodeOffset = Math.max(0, Math.floor((all.length - 1) / NODE_PAGE) * NODE_PAGE);
    const page = all.slice(state.nodeOffset, state.nodeOffset + NODE_PAGE);
    const body = document.querySelector("#nodes tbody");
    const rows = page.map(nodeRow);
    body.replaceChildren(...rows);
    const unread = Math.max(0, (state.sessions.get(state.selected)?.node_count || 0) - state.nodes.size);
    const more = unread && !$("node-filter").value ? ` (${unread} not reported yet)` : "";
    $("nodes-range").textContent = all.length
      ? `${state.nodeOffset + 1}–${state.nodeOffset + page.length} of ${all.length}${more}`
      : `no nodes${more}`;
    $("nodes-prev").disabled = state.nodeOffset === 0;
    $("nodes-more").disabled = state.nodeOffset + NODE_PAGE >= all.length;
    const open = new URLSearchParams(window.location.search).get("node");
    for (const row of rows) row.classList.toggle("selected", row.dataset.nodeId === open);
  }

  function nodeRow(node) {
    const row = document.createElement("tr");
    row.dataset.nodeId = node.node_id;
    const error = node.error ? `${node.error.type}: ${node.error.message}` : node.reason || "";
    const name = wrap("td", link(sessionHref(state.selected, `node=${encodeURIComponent(node.node_id)}`), node.node_id));
    row.append(name, wrap("td", statusBadge(node.status)), el("td", shownAttempts(node)),
      el("td", node.worker || "", "col-worker"), el("td", node.execution_time_ms ?? ""),
      el("td", node.finished_at ? when(node.finished_at) : "", "col-finished"), el("td", error, "error-cell"));
    row.addEventListener("click", (event) => {
      event.preventDefault();
      quietly(openNodeDetail(node.node_id, true));
    });
    return row;
  }

  // Rows on screen whose node changed get their full record again (worker, times, error).
  let refreshing = false;
  async function refreshShownNodes() {
    if (refreshing || !state.selected) return;
    const shown = new Set([...document.querySelectorAll("#nodes tbody tr")].map((row) => row.dataset.nodeId));
    const open = $("node-detail").hidden ? null : $("node-detail-id").textContent;
    const wanted = [...state.changedNodes].filter((id) => shown.has(id) || id === open).slice(0, 25);
    state.changedNodes.clear();
    if (!wanted.length) return;
    refreshing = true;
    const sid = state.selected;
    try {
      const fresh = await Promise.all(wanted.map((id) => api(`sessions/${sid}/nodes/${encodeURIComponent(id)}`).catch(() => null)));
      if (state.selected !== sid) return;
      for (const node of fresh) {
        if (!node) continue;
        const known = state.nodes.get(node.node_id);
        // An event newer than this read keeps its status (the next change reads the node again).
        if (known && known.status !== node.status && STATUS_RANK[known.status] < STATUS_RANK[node.status]) continue;
        if (known && known.status !== node.status) {
          state.nodeCounts[known.status] -= 1;
          state.nodeCounts[node.status] += 1;
        }
        state.nodes.set(node.node_id, node);
        if (node.node_id === open) showNodeDetail(node);
      }
      renderNodes();
    } finally {
      refreshing = false;
    }
  }

  function showSort() {
    for (const th of document.querySelectorAll("#nodes thead th")) {
      const key = th.querySelector("button")?.dataset.sort;
      if (!key) continue;
      if (key === state.sort.key) th.setAttribute("aria-sort", state.sort.dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
  }

  for (const button of document.querySelectorAll("#nodes thead button[data-sort]")) {
    button.addEventListener("click", () => {
      const key = button.dataset.sort;
      state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
      state.nodeOffset = 0;
      showSort();
      writeNodeQuery();
      renderNodes();
    });
  }

  async function openNodeDetail(id, scroll) {
    const sid = state.selected;
    writeNodeQuery(id);
    for (const row of document.querySelectorAll("#nodes tbody tr")) row.classList.toggle("selected", row.dataset.nodeId === id);
    let node;
    try {
      node = await api(`sessions/${sid}/nodes/${encodeURIComponent(id)}`);
    } catch (error) {
      if (error.status !== 404) throw error;
      node = { node_id: id, status: "pending", attempts: 0 }; // dispatched, not reported yet
    }
    if (state.selected !== sid) return;
    showNodeDetail(node);
    if (scroll) {
      $("node-detail").scrollIntoView({ block: "start", behavior: "instant" });
      $("node-detail").focus({ preventScroll: true });
    }
  }

  function showNodeDetail(node) {
    $("node-detail").hidden = false;
    $("node-detail-id").textContent = node.node_id;
    const fields = [
      ["status", null], ["attempts", shownAttempts(node)], ["worker", node.worker || "—"],
      ["task id", node.task_id || "—"], ["started", when(node.started_at)], ["finished", when(node.finished_at)],
      ["time", node.execution_time_ms !== null && node.execution_time_ms !== undefined ? `${node.execution_time_ms} ms` : "—"],
      ["error", node.error ? `${node.error.type}: ${node.error.message}` : "—"], ["reason", node.reason || "—"],
    ];
    if (node.progress !== null && node.progress !== undefined) fields.push(["progress", `${Math.round(node.progress * 100)} %`]);
    $("node-detail-fields").replaceChildren(...fields.flatMap(([label, value]) => [
      el("dt", label), label === "status" ? wrap("dd", statusBadge(node.status)) : el("dd", value),
    ]));
    $("node-detail-result").textContent = node.result === null || node.result === undefined ? "—" : JSON.stringify(node.result, null, 2);
  }

  function closeNodeDetail(write) {
    $("node-detail").hidden = true;
    if (write && state.selected) writeNodeQuery(null);
  }

  $("node-detail-close").addEventListener("click", () => {
    closeNodeDetail(true);
    renderNodes();
  });
  $("node-filter").addEventListener("change", () => {
    state.nodeOffset = 0;
    writeNodeQuery();
    renderNodes();
  });
  $("node-search").addEventListener("input", () => {
    state.nodeOffset = 0;
    writeNodeQuery();
    renderNodes();
  });
  $("nodes-prev").addEventListener("click", () => {
    state.nodeOffset = Math.max(0, state.nodeOffset - NODE_PAGE);
    renderNodes();
  });
  $("nodes-more").addEventListener("click", () => {
    state.nodeOffset += NODE_PAGE;
    renderNodes();
  });

  // -- failures and children ------------------------------------------------------------------

  let failuresTimer = null;
  function scheduleFailures() {
    if (failuresTimer) return;
    failuresTimer = setTimeout(() => {
      failuresTimer = null;
      quietly(loadFailures());
    }, 500);
  }

  async function loadFailures() {
    const sid = state.selected;
    if (!sid) return;
    const groups = await api(`sessions/${sid}/failures`);
    if (state.selected !== sid) return;
    const session = state.sessions.get(sid);
    const resumable = session && ENDED_RESUMABLE.has(session.status);
    const rows = groups.map((group) => {
      const examples = wrap("td", ...group.node_ids.flatMap((id, i) => [
        i ? ", " : "", link(sessionHref(sid, `node=${encodeURIComponent(id)}`), id),
      ]));
      examples.addEventListener("click", (event) => {
        const a = event.target.closest("a");
        if (!a) return;
        event.preventDefault();
        quietly(openNodeDetail(a.textContent, true));
      });
      const button = el("button", "Resume this group");
      button.type = "button";
      button.disabled = !resumable;
      button.title = resumable ? `Re-send the ${group.count} nodes failed with ${group.error_type}` : "Once the session has ended";
      button.addEventListener("click", () => confirmAction("resume-group", group));
      const row = wrap("tr", el("td", group.error_type, "status-failed"), el("td", group.count),
        el("td", group.first_message, "error-cell"), examples, wrap("td", ...(state.tokenRequired ? [button] : [])));
      row.dataset.errorType = group.error_type;
      return row;
    });
    document.querySelector("#failures tbody").replaceChildren(...rows);
    $("failures").hidden = rows.length === 0;
  }

  let childrenTimer = null;
  function scheduleChildren() {
    if (childrenTimer) return;
    childrenTimer = setTimeout(() => {
      childrenTimer = null;
      quietly(loadChildren(state.selected, document.querySelector("#children > .tree"), 0));
    }, 500);
  }

  // Child sessions as a tree, each with its own bar; grandchildren are read when opened.
  async function loadChildren(sid, list, depth) {
    if (!sid) return;
    const children = await api(`sessions/${sid}/children`);
    const shown = children.slice(0, 50);
    const statuses = await Promise.all(shown.map((child) => api(`status/${child.session_id}`).catch(() => null)));
    const items = shown.map((child, i) => {
      const info = statuses[i];
      const bar = el("div", null, "stack mini");
      bar.setAttribute("role", "img");
      const line = wrap("div", link(sessionHref(child.session_id), info ? info.canvas_path : child.session_id.slice(0, 8)),
        statusBadge(info ? info.status : child.status), el("span", `node ${child.node_id}`, "muted"));
      line.className = "child";
      const item = wrap("li", line);
      item.dataset.sessionId = child.session_id;
      if (info) {
        fillStack(bar, info);
        line.append(bar, el("span", `${info.progress_percent} %`, "muted"));
        if (info.children && depth < 5) {
          const more = wrap("details", el("summary", `${info.children} child session${info.children === 1 ? "" : "s"}`));
          const sub = el("ul", null, "tree");
          more.append(sub);
          more.addEventListener("toggle", () => {
            if (more.open && !sub.children.length) quietly(loadChildren(child.session_id, sub, depth + 1));
          });
          item.append(more);
        }
      }
      return item;
    });
    if (children.length > shown.length) items.push(el("li", `and ${children.length - shown.length} more`, "muted"));
    list.replaceChildren(...items);
    if (depth === 0) $("children").hidden = items.length === 0;
  }

  // -- acting: cancel, terminate, resume ------------------------------------------------------

  function confirmAction(kind, group) {
    const session = state.sessions.get(state.selected);
    if (!session) return;
    const parts = counts(session);
    const unfinished = parts.pending + parts.running + parts.retrying;
    const texts = {
      cancel: ["Cancel this session?", `Its ${unfinished} unfinished nodes become cancelled and their queued tasks are revoked. Running nodes finish their current attempt.`],
      terminate: ["Terminate this session?", `Its ${unfinished} unfinished nodes become cancelled, queued tasks are revoked, and the ${parts.running + parts.retrying} running now are killed in their worker processes.`],
      "resume-failed": ["Resume this session?", `Re-sends the ${parts.failed + parts.lost} failed or lost nodes and the ${parts.cancelled + parts.skipped + parts.pending} that did not run; completed nodes keep their results.`],
      "resume-unfinished": ["Resume what did not run?", `Re-sends the ${parts.cancelled + parts.skipped + parts.lost + parts.pending} nodes that did not finish; failed nodes keep their failure.`],
      "resume-group": ["Resume this group?", group ? `Re-sends the ${group.count} nodes failed with ${group.error_type}, and what did not complete after them.` : ""],
    };
    const [title, body] = texts[kind];
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = body;
    $("confirm-error").textContent = "";
    $("confirm-token-label").hidden = !state.tokenRequired;
    $("confirm-token").value = state.token || "";
    $("confirm-token").required = state.tokenRequired;
    $("confirm-ok").textContent = { cancel: "Cancel session", terminate: "Terminate", "resume-failed": "Resume", "resume-unfinished": "Resume", "resume-group": "Resume group" }[kind];
    $("confirm").dataset.kind = kind;
    $("confirm").errorType = group ? group.error_type : null;
    $("confirm").showModal();
    (state.tokenRequired && !state.token ? $("confirm-token") : $("confirm-ok")).focus();
  }

  async function runAction(event) {
    event.preventDefault();
    const dialog = $("confirm");
    const kind = dialog.dataset.kind;
    const sid = state.selected;
    const token = $("confirm-token").value;
    const headers = { Accept: "application/json" };
    if (state.tokenRequired) headers.Authorization = `Bearer ${token}`;
    const params = {
      cancel: [`sessions/${sid}/cancel`, {}],
      terminate: [`sessions/${sid}/cancel`, { terminate: "true" }],
      "resume-failed": [`sessions/${sid}/resume`, { retry_failed: "true" }],
      "resume-unfinished": [`sessions/${sid}/resume`, { retry_failed: "false" }],
      "resume-group": [`sessions/${sid}/resume`, { error_type: dialog.errorType }],
    }[kind];
    $("confirm-ok").disabled = true;
    try {
      const body = await api(params[0], params[1], { method: "POST", headers });
      if (state.tokenRequired) state.token = token; // it worked: not asked again on this page
      dialog.close();
      const done = body.resent_nodes !== undefined ? `Resumed: ${body.resent_nodes.length} nodes re-sent.` : "Cancelled.";
      setConnection(done, false);
      state.nodesLoaded = false;
      await refreshOne(sid);
      followStreams();
    } catch (error) {
      if (error instanceof AuthRequired) {
        dialog.close();
        return;
      }
      $("confirm-error").textContent = error.status === 401 ? "Wrong token." : error.message;
    } finally {
      $("confirm-ok").disabled = false;
    }
  }

  $("act-cancel").addEventListener("click", () => confirmAction("cancel"));
  $("act-terminate").addEventListener("click", () => confirmAction("terminate"));
  $("act-resume-failed").addEventListener("click", () => confirmAction("resume-failed"));
  $("act-resume-unfinished").addEventListener("click", () => confirmAction("resume-unfinished"));
  $("confirm-form").addEventListener("submit", runAction);
  $("confirm-cancel").addEventListener("click", () => $("confirm").close());

  // -- workers --------------------------------------------------------------------------------

  async function refreshWorkers() {
    if (state.view !== "workers" || state.needLogin) return;
    const workers = await api("workers");
    if (state.view !== "workers") return;
    const rows = workers.map((worker) => {
      const holds = wrap("td", ...worker.nodes.flatMap((held, i) => [
        i ? ", " : "", link(sessionHref(held.session_id, `node=${encodeURIComponent(held.node_id)}`), held.node_id),
      ]));
      if (worker.running > worker.nodes.length) holds.append(` and ${worker.running - worker.nodes.length} more`);
      const row = wrap("tr", el("td", worker.worker), wrap("td", statusBadge(worker.alive ? "running" : "lost")),
        el("td", `${duration(worker.seen_s_ago)} ago · ${when(worker.last_seen_at)}`), el("td", worker.running), holds);
      row.querySelector(".status").textContent = worker.alive ? "alive" : "silent";
      row.dataset.worker = worker.worker;
      return row;
    });
    document.querySelector("#workers tbody").replaceChildren(...rows);
    $("workers-empty").hidden = rows.length > 0;
  }

  // -- login ----------------------------------------------------------------------------------

  // Forget everything read: a logged-out page shows nothing of the data.
  function clearData() {
    closeStreams();
    for (const map of [state.sessions, state.rows, state.lastIds, state.retrying, state.nodes]) map.clear();
    state.order = [];
    state.nodesLoaded = false;
    state.selected = null;
    state.token = null;
    state.listShown = 0;
    state.nextCursor = null;
    state.layout = null;
    state.chart = null;
    for (const body of document.querySelectorAll("tbody")) body.replaceChildren();
    for (const id of ["legend", "figures", "stack", "chart", "node-detail-fields", "node-detail-result", "detail-canvas",
      "detail-status", "detail-id", "detail-parent", "detail-tags", "detail-hint"]) $(id).replaceChildren();
    const canvas = $("node-map");
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    document.querySelector("#children > .tree").replaceChildren();
    $("main").hidden = true;
    document.title = "tracker dashboard";
  }

  function showLogin() {
    state.needLogin = true;
    clearData();
    $("login").hidden = false;
    $("logout").hidden = true;
    setConnection("login needed", true);
    $("login-token").focus();
  }

  async function login(event) {
    event.preventDefault();
    const response = await request(LOGIN_URL, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token: $("login-token").value }),
    }).catch(() => null);
    $("login-token").value = "";
    if (!response) return;
    if (response.status === 204) {
      state.needLogin = false;
      state.loggedIn = true;
      $("login").hidden = true;
      $("login-error").textContent = "";
      start();
    } else {
      const body = await response.json().catch(() => ({}));
      $("login-error").textContent = detailOf(body, response);
    }
  }

  async function logout() {
    await request(LOGOUT_URL, { method: "POST" }).catch(() => null);
    state.loggedIn = false;
    showLogin();
  }

  // -- the clock: "updated N s ago", elapsed time and ETA move every second --------------------

  function tick() {
    if (state.offline) {
      const age = state.lastOk === null ? null : (Date.now() - state.lastOk) / 1000;
      $("offline-age").textContent = age === null ? "never updated" : `updated ${duration(age)} ago`;
    }
    const session = state.sessions.get(state.selected);
    if (state.view === "session" && session) renderFigures(session);
  }

  // -- start ----------------------------------------------------------------------------------

  function start() {
    $("main").hidden = false;
    $("logout").hidden = !(state.tokenRequired && state.loggedIn);
    route();
  }

  async function boot() {
    try {
      const response = await request(STATE_URL, { headers: { Accept: "application/json" } });
      const body = await response.json();
      state.tokenRequired = body.token_required;
      state.loggedIn = body.logged_in;
    } catch (error) {
      return; // offline: the banner says so; the next refresh tries again
    }
    state.booted = true;
    if (state.tokenRequired && !state.loggedIn) showLogin();
    else start();
  }

  function refresh() {
    if (!state.booted) {
      quietly(boot());
      return;
    }
    if (state.needLogin) return;
    if (state.view === "sessions") quietly(refreshSessions());
    else if (state.view === "workers") quietly(refreshWorkers());
    // An open session is read again too: its stream's events do not carry the rate, the ETA, nor
    // the exact counts of other statuses than completed and failed.
    else if (state.view === "session" && state.selected) quietly(refreshOne(state.selected));
  }

  $("login").addEventListener("submit", login);
  $("logout").addEventListener("click", () => quietly(logout()));
  for (const id of ["status-filter", "tag-filter", "path-filter"]) {
    $(id).addEventListener("change", () => {
      state.listShown = 0;
      state.listGeneration += 1;
      writeListFilters();
      quietly(refreshSessions());
    });
  }
  $("sessions-more").addEventListener("click", () => quietly(moreSessions()));
  quietly(boot());
  setInterval(refresh, REFRESH_MS);
  setInterval(tick, 1000);
})();
