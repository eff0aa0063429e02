// tracker dashboard: plain JavaScript, no build step, no dependencies.
//
// The session list is read from GET /sessions every few seconds (that is how new sessions appear);
// the sessions that are still going, at most MAX_STREAMS of them (the selected one first), are
// followed live through their Server-Sent Events stream. Browsers open only ~6 connections per
// host over HTTP/1.1, hence the cap. Every value shown comes from the API and is written with
// textContent, never as HTML.
"use strict";

(() => {
  const API = new URL("api/v1/parallel/", document.baseURI);
  const LOGIN_URL = new URL("dashboard/login", document.baseURI);
  const LOGOUT_URL = new URL("dashboard/logout", document.baseURI);
  const query = new URLSearchParams(window.location.search);
  const REFRESH_MS = Math.max(0.5, Number(query.get("refresh")) || 2) * 1000;
  const MAX_STREAMS = 4;
  const PAGE = 50;
  const TERMINAL = new Set(["completed", "partial_failure", "failed", "cancelled"]);
  const EVENT_TYPES = ["created", "status", "progress", "node", "reset", "added", "child"];

  const state = {
    sessions: new Map(), // task_id -> ParallelTaskStatus (merged with live events)
    rows: new Map(), // task_id -> <tr>
    streams: new Map(), // task_id -> EventSource
    lastIds: new Map(), // task_id -> last event id seen (for a manual reconnect)
    retrying: new Map(), // task_id -> Set of node ids whose latest event seen here is "retrying"
    selected: null,
    nextCursor: null,
    nodeCursor: null,
    nodesShown: 0,
    needLogin: false,
    nodeTimer: null,
    eventsApplied: 0, // stream events applied to the page (tells live updates from list refreshes)
  };
  window.trackerDashboard = state; // for curious people with a console (and for tests)

  const $ = (id) => document.getElementById(id);

  class AuthRequired extends Error {}

  async function api(path, params) {
    const url = new URL(path, API);
    for (const [key, value] of Object.entries(params || {})) {
      if (value !== null && value !== undefined && value !== "") url.searchParams.set(key, value);
    }
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (response.status === 401) {
      showLogin();
      throw new AuthRequired("login needed");
    }
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(`${response.status}: ${typeof body.detail === "string" ? body.detail : response.statusText}`);
    }
    return response.json();
  }

  function setConnection(text, isError) {
    const node = $("connection");
    node.textContent = text;
    node.className = isError ? "error" : "muted";
  }

  // -- rendering ----------------------------------------------------------------------------

  function text(tag, value, className) {
    const node = document.createElement(tag);
    node.textContent = value === null || value === undefined ? "" : String(value);
    if (className) node.className = className;
    return node;
  }

  function statusBadge(status) {
    return text("span", status, `status status-${status}`);
  }

  function progressBar() {
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    bar.append(text("div", "", "fill"), text("span", "", "label"));
    return bar;
  }

  function setProgress(bar, percent, status) {
    const value = Math.round(Number(percent) * 10) / 10;
    bar.setAttribute("aria-valuenow", String(value));
    bar.className = `bar status-${status}`;
    bar.querySelector(".fill").style.width = `${value}%`;
    bar.querySelector(".label").textContent = `${value} %`;
  }

  function time(iso) {
    return iso ? new Date(iso).toLocaleTimeString() : "";
  }

  function dateTime(iso) {
    return iso ? new Date(iso).toLocaleString() : null;
  }

  function renderRow(session) {
    let row = state.rows.get(session.task_id);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.sessionId = session.task_id;
      const id = text("td", "");
      id.append(text("code", session.task_id.slice(0, 8)));
      id.title = session.task_id;
      const progress = document.createElement("td");
      progress.append(progressBar());
      row.append(id, text("td", "", "canvas"), text("td", "", "status-cell"), progress, text("td", "", "counts"),
        text("td", "", "updated"));
      row.addEventListener("click", () => select(session.task_id));
      state.rows.set(session.task_id, row);
    }
    row.querySelector(".canvas").textContent = session.canvas_path;
    row.querySelector(".status-cell").replaceChildren(statusBadge(session.status));
    setProgress(row.querySelector(".bar"), session.progress_percent, session.status);
    row.querySelector(".counts").textContent =
      `${session.completed_nodes} / ${session.failed_nodes} / ${session.running_nodes} / ${session.pending_nodes}` +
      ` of ${session.node_count}`;
    row.querySelector(".updated").textContent = time(session.updated_at);
    row.classList.toggle("selected", state.selected === session.task_id);
    return row;
  }

  function renderSummary() {
    const session = state.sessions.get(state.selected);
    if (!session) return;
    $("detail-id").textContent = session.task_id;
    // The server decides when a session looks stuck (GET status and the listing carry its hint);
    // the first node event makes it running, and the hint is then over whatever it said.
    const hint = $("detail-hint");
    hint.textContent = session.hint || "";
    hint.hidden = !(session.hint && session.status === "pending");
    const summary = $("detail-summary");
    summary.replaceChildren();
    const fields = [
      ["canvas", session.canvas_path], ["status", session.status], ["progress", `${session.progress_percent} %`],
      ["nodes", session.node_count], ["completed", session.completed_nodes], ["failed", session.failed_nodes],
      ["running", session.running_nodes], ["retrying", session.retrying_nodes], ["pending", session.pending_nodes],
      ["lost", session.lost_nodes], ["cancelled", session.cancelled_nodes], ["skipped", session.skipped_nodes],
      ["created", dateTime(session.created_at)], ["started", dateTime(session.started_at)],
      ["finished", dateTime(session.finished_at)], ["updated", dateTime(session.updated_at)],
    ];
    for (const [label, value] of fields) {
      summary.append(text("dt", label), label === "status" ? wrap("dd", statusBadge(value)) :
        text("dd", value ?? "—", label === "retrying" ? "count-retrying" : ""));
    }
  }

  function wrap(tag, child) {
    const node = document.createElement(tag);
    node.append(child);
    return node;
  }

  function update(session) {
    state.sessions.set(session.task_id, session);
    renderRow(session);
    if (state.selected === session.task_id) renderSummary();
  }

  // -- the session list ---------------------------------------------------------------------

  async function refreshSessions() {
    if (state.needLogin) return;
    try {
      const page = await api("sessions", { status: $("status-filter").value, limit: PAGE });
      const body = document.querySelector("#sessions tbody");
      let previous = null;
      for (const session of page.sessions) {
        const row = renderRow(session);
        state.sessions.set(session.task_id, session);
        // Keep the first page in the API's order (newest first), above any "more" rows.
        if (previous === null ? body.firstChild !== row : previous.nextSibling !== row) {
          if (previous === null) body.prepend(row);
          else previous.after(row);
        }
        previous = row;
      }
      if (state.nextCursor === null) state.nextCursor = page.next_cursor;
      $("sessions-more").hidden = state.nextCursor === null;
      $("sessions-empty").hidden = state.rows.size > 0;
      if (state.selected) renderSummary();
      setConnection(`live · ${state.streams.size} stream(s)`, false);
      followStreams();
    } catch (error) {
      if (!(error instanceof AuthRequired)) setConnection(`offline: ${error.message}`, true);
    }
  }

  async function moreSessions() {
    if (state.nextCursor === null) return;
    const page = await api("sessions", { status: $("status-filter").value, limit: PAGE, cursor: state.nextCursor });
    const body = document.querySelector("#sessions tbody");
    for (const session of page.sessions) {
      state.sessions.set(session.task_id, session);
      body.append(renderRow(session));
    }
    state.nextCursor = page.next_cursor;
    $("sessions-more").hidden = state.nextCursor === null;
  }

  function resetList() {
    for (const stream of state.streams.values()) stream.close();
    state.streams.clear();
    state.rows.clear();
    state.sessions.clear();
    state.nextCursor = null;
    document.querySelector("#sessions tbody").replaceChildren();
    refreshSessions();
  }

  // -- live streams -------------------------------------------------------------------------

  function followStreams() {
    const wanted = [];
    if (state.selected && !TERMINAL.has(state.sessions.get(state.selected)?.status)) wanted.push(state.selected);
    for (const row of document.querySelectorAll("#sessions tbody tr")) {
      if (wanted.length >= MAX_STREAMS) break;
      const id = row.dataset.sessionId;
      const session = state.sessions.get(id);
      if (session && !TERMINAL.has(session.status) && !wanted.includes(id)) wanted.push(id);
    }
    for (const [id, stream] of state.streams) {
      if (!wanted.includes(id)) {
        stream.close();
        state.streams.delete(id);
      }
    }
    for (const id of wanted) if (!state.streams.has(id)) openStream(id);
  }

  function openStream(id) {
    const url = new URL(`sessions/${id}/events`, API);
    if (state.lastIds.has(id)) url.searchParams.set("last_event_id", state.lastIds.get(id));
    const stream = new EventSource(url);
    state.streams.set(id, stream);
    const remember = (event) => {
      if (event.lastEventId) state.lastIds.set(id, event.lastEventId);
    };
    stream.addEventListener("snapshot", (event) => {
      remember(event);
      update(JSON.parse(event.data));
    });
    for (const type of EVENT_TYPES) {
      stream.addEventListener(type, (event) => {
        remember(event);
        applyEvent(id, JSON.parse(event.data));
      });
    }
    stream.addEventListener("end", () => {
      stream.close();
      state.streams.delete(id);
      refreshOne(id);
    });
    stream.addEventListener("error", () => {
      // A dropped connection is retried by the browser itself (with Last-Event-ID). A refused one
      // (401, 404, 503) closes the stream: the next list refresh opens it again if still wanted.
      if (stream.readyState === EventSource.CLOSED && state.streams.get(id) === stream) state.streams.delete(id);
    });
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
      // The running, retrying and skipped counts are not in the event; they are exact again at the
      // next list refresh. A skipped node never started: it leaves pending, not running. A node
      // waiting for Celery's retry is counted apart from running until its next attempt starts or
      // it ends; the nodes seen entering retrying here are remembered, so that their next event
      // takes them out of retrying rather than out of running.
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
      merged.running_nodes = Math.min(Math.max(0, running), session.node_count);
      merged.retrying_nodes = Math.min(Math.max(0, retrying), session.node_count);
      if (event.node_status === "skipped") {
        merged.skipped_nodes = Math.min((session.skipped_nodes || 0) + 1,
          Math.max(0, session.node_count - merged.completed_nodes - merged.failed_nodes - merged.cancelled_nodes));
      }
    }
    merged.pending_nodes = Math.max(0, merged.node_count - merged.completed_nodes - merged.failed_nodes -
      merged.cancelled_nodes - (merged.skipped_nodes || 0) - merged.running_nodes - (merged.retrying_nodes || 0));
    update(merged);
    if (state.selected === id && event.type !== "progress") scheduleNodes();
  }

  async function refreshOne(id) {
    try {
      update(await api(`status/${id}`));
      if (state.selected === id) scheduleNodes();
    } catch (error) {
      if (!(error instanceof AuthRequired)) setConnection(`offline: ${error.message}`, true);
    }
  }

  // -- one session's nodes ------------------------------------------------------------------

  function select(id) {
    state.selected = id;
    for (const [rowId, row] of state.rows) row.classList.toggle("selected", rowId === id);
    $("detail").hidden = false;
    renderSummary();
    loadNodes(false);
    followStreams();
  }

  function scheduleNodes() {
    clearTimeout(state.nodeTimer);
    state.nodeTimer = setTimeout(() => loadNodes(false, true), 300);
  }

  async function loadNodes(more, keepCount) {
    const id = state.selected;
    if (!id) return;
    const limit = keepCount ? Math.min(1000, Math.max(100, state.nodesShown)) : 100;
    try {
      const page = await api(`sessions/${id}/nodes`, {
        status: $("node-filter").value,
        limit,
        cursor: more ? state.nodeCursor : null,
      });
      if (id !== state.selected) return;
      const body = document.querySelector("#nodes tbody");
      if (!more) body.replaceChildren();
      for (const node of page.nodes) body.append(nodeRow(node));
      state.nodesShown = body.children.length;
      state.nodeCursor = page.next_cursor;
      $("nodes-more").hidden = page.next_cursor === null;
    } catch (error) {
      if (!(error instanceof AuthRequired)) setConnection(`offline: ${error.message}`, true);
    }
  }

  function nodeRow(node) {
    const row = document.createElement("tr");
    row.dataset.nodeId = node.node_id;
    const error = node.error ? `${node.error.type}: ${node.error.message}` : node.reason || "";
    row.append(text("td", node.node_id), wrap("td", statusBadge(node.status)), text("td", node.attempts),
      text("td", node.worker || ""), text("td", node.execution_time_ms ?? ""), text("td", error, "error-cell"));
    return row;
  }

  // -- login --------------------------------------------------------------------------------

  function showLogin() {
    state.needLogin = true;
    $("login").hidden = false;
    setConnection("login needed", true);
    $("login-token").focus();
  }

  async function login(event) {
    event.preventDefault();
    const response = await fetch(LOGIN_URL, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token: $("login-token").value }),
    });
    $("login-token").value = "";
    if (response.status === 204) {
      state.needLogin = false;
      $("login").hidden = true;
      $("login-error").textContent = "";
      $("logout").hidden = false;
      resetList();
    } else {
      const body = await response.json().catch(() => ({}));
      $("login-error").textContent = typeof body.detail === "string" ? body.detail : `error ${response.status}`;
    }
  }

  async function logout() {
    await fetch(LOGOUT_URL, { method: "POST", credentials: "same-origin" });
    $("logout").hidden = true;
    resetList();
  }

  // -- start --------------------------------------------------------------------------------

  $("login").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("status-filter").addEventListener("change", resetList);
  $("node-filter").addEventListener("change", () => loadNodes(false));
  $("sessions-more").addEventListener("click", moreSessions);
  $("nodes-more").addEventListener("click", () => loadNodes(true));
  refreshSessions();
  setInterval(refreshSessions, REFRESH_MS);
})();
