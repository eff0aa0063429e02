-- common: prepended to every script at load time. Not a script of its own.
-- KEYS[1..7] are always one session's keys: session (HASH), nodes (HASH), sigs (HASH), events (STREAM),
-- by_status (ZSET), children (HASH), failures (HASH).
-- The tables below mirror tracker/states.py; tests/unit/test_lua_tables.py checks they agree.
local S, N, G, E, X, C, F = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
-- How many session keys come first in KEYS (the others, global, follow).
local SESSION_KEYS = 7

-- node status -> the session counter it counts in
local COUNTER = {completed = 'completed', failed = 'failed', lost = 'failed', cancelled = 'cancelled',
                 skipped = 'skipped', running = 'running', retrying = 'retrying'}
-- node statuses that are a result (count towards the finish rule)
local TERMINAL_NODE = {completed = true, failed = true, lost = true, cancelled = true, skipped = true}
-- session statuses that end a session
local TERMINAL_SESSION = {completed = true, partial_failure = true, failed = true, cancelled = true}

-- The session's state fields as a table, or nil when the session does not exist. Every write reads
-- them and replies them, unrolled, in the order of redis.py SESSION_FIELDS (tests/unit/test_lua_tables.py).
local function load_session()
  local v = redis.call('HMGET', S, 'status', 'node_count', 'completed', 'failed', 'running', 'lost', 'cancelled',
                       'skipped', 'retrying', 'progress', 'started_ms', 'finished_ms', 'updated_ms', 'canvas_path',
                       'created_ms', 'metadata', 'run', 'children', 'children_open', 'parent', 'failure_types', 'rate',
                       'tags', 'linked', 'unneeded', 'partial', 'ended_ttl')
  if not v[1] then return nil end
  local s = {status = v[1], node_count = tonumber(v[2]) or 0, completed = tonumber(v[3]) or 0,
             failed = tonumber(v[4]) or 0, running = tonumber(v[5]) or 0, lost = tonumber(v[6]) or 0,
             cancelled = tonumber(v[7]) or 0, skipped = tonumber(v[8]) or 0, retrying = tonumber(v[9]) or 0,
             progress = v[10] or '', started_ms = v[11] or '', finished_ms = v[12] or '', updated_ms = v[13] or '',
             canvas_path = v[14] or '', created_ms = v[15] or '', metadata = v[16] or '', run = tonumber(v[17]) or 1,
             children = tonumber(v[18]) or 0, children_open = tonumber(v[19]) or 0, parent = v[20] or '',
             failure_types = tonumber(v[21]) or 0, rate = v[22] or '', tags = v[23] or '', linked = v[24] == '1',
             unneeded = tonumber(v[25]) or 0, partial = tonumber(v[26]) or 0, ended_ttl = v[27] or ''}
  -- What the hash holds now (false: missing), in save_session's order: it writes what differs.
  s.stored = {v[1], v[3] and s.completed, v[4] and s.failed, v[5] and s.running, v[6] and s.lost,
              v[7] and s.cancelled, v[8] and s.skipped, v[10], v[11], v[12], v[25] and s.unneeded,
              v[9] and s.retrying, v[26] and s.partial, v[18] and s.children, v[19] and s.children_open,
              v[21] and s.failure_types, v[22] or ''}
  return s
end

-- The session's fields as a list, in SESSION_FIELDS order (what record_nodes replies).
local function session_values(s)
  return {s.status, s.node_count, s.completed, s.failed, s.running, s.lost, s.cancelled, s.skipped, s.retrying, s.progress,
          s.started_ms, s.finished_ms, s.updated_ms, s.canvas_path, s.created_ms, s.metadata, s.run, s.children,
          s.children_open, s.parent, s.failure_types, s.rate, s.tags}
end

-- The recent rate of finishing nodes (tracker.states.RateWindow), kept in the `rate` field as
-- 'since_ms|since_done|mid_ms|mid_done|last_ms|last_done': the finished count at the start of the
-- window, half-way, and at the last change. The window moves on by half once its second half is
-- RATE_HALF_WINDOW_MS old, so the rate covers the last 30 to 60 s. It starts again where the count
-- went back (a resume, a node sent back to pending).
local RATE_HALF_WINDOW_MS = 30000

-- How many of the session's nodes have a result (what progress and the finish rule count).
local function finished_count(s)
  return s.completed + s.failed + s.cancelled + s.skipped
end

local function set_window(s, w)
  s.rate = string.format('%d|%d|%d|%d|%d|%d', w[1], w[2], w[3], w[4], w[5], w[6])
end

local function rate_window(s, now_ms)
  if s.started_ms == '' then return end
  local done = finished_count(s)
  if tonumber(string.match(s.rate, '|(%d+)$')) == done then return end -- (a start: nothing finished)
  local w = {}
  for v in string.gmatch(s.rate, '[^|]+') do w[#w + 1] = tonumber(v) end
  local now = tonumber(now_ms)
  if #w ~= 6 then
    local since = tonumber(s.started_ms)
    w = {since, 0, since, 0, since, 0}
  elseif done < w[4] then
    w = {now, done, now, done, now, done}
  end
  if done ~= w[6] then
    if now - w[3] >= RATE_HALF_WINDOW_MS then w[1], w[2], w[3], w[4] = w[3], w[4], now, done end
    w[5], w[6] = now, done
  end
  set_window(s, w)
end

-- A new run (a resume): the rate is measured from now on.
local function restart_rate(s, now_ms)
  local done = finished_count(s)
  set_window(s, {now_ms, done, now_ms, done, now_ms, done})
end

-- Writes updated_ms and the state fields that differ from what load_session read: the session hash
-- is small, so Redis keeps it as a listpack where each field written is a scan, and each counter
-- passed is a number formatted as text. updated_ms never goes back: a writer whose clock lags (or
-- whose call was slow) must not make an active session look idle to cleanup. Returns it.
local function save_session(s, now_ms)
  local updated = now_ms
  if s.updated_ms ~= '' and tonumber(s.updated_ms) > tonumber(now_ms) then updated = s.updated_ms end
  local was = s.stored
  rate_window(s, updated)
  local a = {'updated_ms', updated, false, false, false, false, false, false, false, false, false, false, false, false,
             false, false, false, false, false, false, false, false, false, false, false, false, false, false, false,
             false, false, false, false, false, false, false}
  local n = 2
  if s.status ~= was[1] then a[n + 1] = 'status'; a[n + 2] = s.status; n = n + 2 end
  if s.completed ~= was[2] then a[n + 1] = 'completed'; a[n + 2] = s.completed; n = n + 2 end
  if s.failed ~= was[3] then a[n + 1] = 'failed'; a[n + 2] = s.failed; n = n + 2 end
  if s.running ~= was[4] then a[n + 1] = 'running'; a[n + 2] = s.running; n = n + 2 end
  if s.lost ~= was[5] then a[n + 1] = 'lost'; a[n + 2] = s.lost; n = n + 2 end
  if s.cancelled ~= was[6] then a[n + 1] = 'cancelled'; a[n + 2] = s.cancelled; n = n + 2 end
  if s.skipped ~= was[7] then a[n + 1] = 'skipped'; a[n + 2] = s.skipped; n = n + 2 end
  if s.progress ~= was[8] then a[n + 1] = 'progress'; a[n + 2] = s.progress; n = n + 2 end
  if s.started_ms ~= was[9] then a[n + 1] = 'started_ms'; a[n + 2] = s.started_ms; n = n + 2 end
  if s.finished_ms ~= was[10] then a[n + 1] = 'finished_ms'; a[n + 2] = s.finished_ms; n = n + 2 end
  if s.unneeded ~= was[11] then a[n + 1] = 'unneeded'; a[n + 2] = s.unneeded; n = n + 2 end
  if s.retrying ~= was[12] then a[n + 1] = 'retrying'; a[n + 2] = s.retrying; n = n + 2 end
  if s.partial ~= was[13] then a[n + 1] = 'partial'; a[n + 2] = s.partial; n = n + 2 end
  if s.children ~= was[14] then a[n + 1] = 'children'; a[n + 2] = s.children; n = n + 2 end
  if s.children_open ~= was[15] then a[n + 1] = 'children_open'; a[n + 2] = s.children_open; n = n + 2 end
  if s.failure_types ~= was[16] then a[n + 1] = 'failure_types'; a[n + 2] = s.failure_types; n = n + 2 end
  if s.rate ~= was[17] then a[n + 1] = 'rate'; a[n + 2] = s.rate; n = n + 2 end
  redis.call('HSET', S, unpack(a, 1, n))
  s.stored = {s.status, s.completed, s.failed, s.running, s.lost, s.cancelled, s.skipped, s.progress, s.started_ms,
              s.finished_ms, s.unneeded, s.retrying, s.partial, s.children, s.children_open, s.failure_types, s.rate}
  return updated
end

-- The payload of an error callback skipped because nothing it handles failed (tracker.structure
-- ERRBACK_NOT_NEEDED): such nodes are also counted in `unneeded`, and do not keep a session from
-- completing.
local ERRBACK_NOT_NEEDED = 'skipped: an error callback, and no task it handles failed'
local UNNEEDED = '{"reason":"' .. ERRBACK_NOT_NEEDED .. '"}'

-- A running node's progress as reported by its task (payload '{"progress":<fraction>}'), in
-- states.PROGRESS_UNITS (10000) per node, rounded half up as states.progress_units does; 0 for none.
local function progress_units(payload)
  local fraction = payload and string.match(payload, '^{"progress":([0-9.eE+-]+)}$')
  if not fraction then return 0 end
  return math.floor(tonumber(fraction) * 10000 + 0.5)
end

-- Move one node's weight in the counters (delta = 1 when it enters status, -1 when it leaves);
-- payload: the node's payload in that status. `partial` sums the progress of the running nodes.
local function count(s, status, delta, payload)
  local counter = COUNTER[status]
  if counter then s[counter] = s[counter] + delta end
  if status == 'lost' then s.lost = s.lost + delta end
  if status == 'skipped' and payload == UNNEEDED then s.unneeded = s.unneeded + delta end
  if status == 'running' then s.partial = s.partial + delta * progress_units(payload) end
end

-- 100 * (finished + the running nodes' fractions) / node_count, rounded half up to 2 decimals
-- (same formula as states.progress_from_counts).
local function derived_progress(s)
  if s.node_count <= 0 then return '0' end
  local finished = finished_count(s)
  return tostring(math.floor((10000 * finished + s.partial) / s.node_count + 0.5) / 100)
end

-- states.finish_status
local function finish_status(s)
  local n = s.node_count
  if n <= 0 or finished_count(s) < n then return nil end
  if s.completed > 0 and s.completed + s.unneeded == n then return 'completed' end
  if s.cancelled > 0 and s.cancelled + s.skipped == n then return 'cancelled' end
  if s.completed == 0 then return 'failed' end
  return 'partial_failure'
end

-- states.rederived_status: an ended session's status after a late result moved its counters, along
-- the edges between ended statuses of states.VALID_TRANSITIONS.
local REDERIVE = {partial_failure = {completed = true, failed = true},
                  failed = {completed = true, partial_failure = true}}
local function rederived_status(s)
  local edges = REDERIVE[s.status]
  local target = edges and finish_status(s)
  if target and edges[target] then return target end
  return s.status
end

local function set_status(s, target, now_ms)
  s.status = target
  if target == 'running' then
    s.finished_ms = ''
    if s.started_ms == '' then s.started_ms = now_ms end
  elseif TERMINAL_SESSION[target] then
    s.finished_ms = now_ms
  end
end

-- A node record: status|attempts|started_ms|finished_ms|task_id|worker|payload (payload may hold '|').
local function parse_node(raw)
  return {string.match(raw, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')}
end

local function node_text(f)
  return f[1] .. '|' .. f[2] .. '|' .. f[3] .. '|' .. f[4] .. '|' .. f[5] .. '|' .. f[6] .. '|' .. f[7]
end

local function emit(s, kind, now_ms, maxlen, node_id, node_status)
  if node_id then
    redis.call('XADD', E, 'MAXLEN', '~', maxlen, '*', 't', kind, 's', s.status, 'p', s.progress,
               'c', s.completed, 'f', s.failed, 'at', now_ms, 'n', node_id, 'ns', node_status)
  else
    redis.call('XADD', E, 'MAXLEN', '~', maxlen, '*', 't', kind, 's', s.status, 'p', s.progress,
               'c', s.completed, 'f', s.failed, 'at', now_ms)
  end
end

-- Every write keeps all the session's keys alive at least ttl_s more (EXPIRE on a missing key is a
-- no-op); an ended session's (s given) its `ended_ttl` (TRACKER_FINISHED_TTL_S, set at create)
-- instead. Seven EXPIREs are a good part of a small write, so they run only when the session hash
-- has less than that left, or more than that plus its step (the session just ended with a shorter
-- retention, or was resumed after a longer one), or `force` (a key was just created); they give it
-- plus a step of a tenth of it (at most 60 s): a session's keys expire between ttl_s and
-- ttl_s + step after its last write, with one refresh per step at most however busy it is.
local function touch(ttl_s, force, s)
  local ttl_ms = tonumber(ttl_s) * 1000
  if s and TERMINAL_SESSION[s.status] and s.ended_ttl ~= '' then ttl_ms = tonumber(s.ended_ttl) * 1000 end
  local life_ms = ttl_ms + math.min(math.floor(ttl_ms / 10), 60000)
  if not force then
    local left = redis.call('PTTL', S)
    if left >= ttl_ms and left <= life_ms then return end
  end
  for i = 1, SESSION_KEYS do redis.call('PEXPIRE', KEYS[i], life_ms) end
end

-- Failures by cause (the failures hash F, tracker.storage.keys): error type -> JSON
-- {"count", "message" (the first node's), "first_ms", "last_ms", "nodes" (the first few ids)}.
-- A node joins its type's group when it fails or is lost, and leaves it when it stops being so (a
-- late success, a resume): moved in the same script run as the counters. `failure_types` counts
-- the groups. Types as tracker.states.failure_type: the error's class name, `lost`, or `unknown`.
local FAILURE_SAMPLE = 5
local function failure_of(status, payload)
  if status ~= 'failed' and status ~= 'lost' then return nil end
  local ok, details = pcall(cjson.decode, payload ~= '' and payload or '{}')
  if not ok or type(details) ~= 'table' then details = {} end
  local err = type(details.error) == 'table' and details.error or {}
  local kind = status == 'lost' and 'lost' or ((type(err[1]) == 'string' and err[1] ~= '') and err[1] or 'unknown')
  local message = type(err[2]) == 'string' and err[2] or (type(details.reason) == 'string' and details.reason or '')
  return kind, message
end

local function regroup(s, node_id, old_status, old_payload, new_status, new_payload, at_ms)
  local old_kind = failure_of(old_status, old_payload)
  local new_kind, message = failure_of(new_status, new_payload)
  if old_kind == new_kind then return end
  if old_kind then
    local raw = redis.call('HGET', F, old_kind)
    if raw then
      local g = cjson.decode(raw)
      g.count = g.count - 1
      if g.count <= 0 then
        redis.call('HDEL', F, old_kind)
        s.failure_types = s.failure_types - 1
      else
        local kept = {}
        for _, id in ipairs(g.nodes) do if id ~= node_id then kept[#kept + 1] = id end end
        g.nodes = kept
        redis.call('HSET', F, old_kind, cjson.encode(g))
      end
    end
  end
  if new_kind then
    local raw = redis.call('HGET', F, new_kind)
    local g, created = nil, false
    if raw then
      g = cjson.decode(raw)
      g.count, g.last_ms = g.count + 1, math.max(g.last_ms, tonumber(at_ms))
      if type(g.nodes) ~= 'table' then g.nodes = {} end -- cjson reads an empty list back as an object
      if #g.nodes < FAILURE_SAMPLE then g.nodes[#g.nodes + 1] = node_id end
    else
      g = {count = 1, message = message, first_ms = tonumber(at_ms), last_ms = tonumber(at_ms), nodes = {node_id}}
      created = s.failure_types == 0 and redis.call('EXISTS', F) == 0
      s.failure_types = s.failure_types + 1
    end
    redis.call('HSET', F, new_kind, cjson.encode(g))
    if created then redis.call('PEXPIRE', F, math.max(redis.call('PTTL', S), 1000)) end -- as the session's keys
  end
end

-- The status index (X): one member '<status>|<node_id>' per node record, all scored 0, so the nodes
-- of one status are a lexicographic range, read a page at a time (get_nodes). Moved in the same
-- script run as the record and the counters. Added before the old member is removed: removing a
-- key's last member deletes the key, and its TTL with it.
local function index(node_id, old_status, new_status)
  if old_status == new_status then return end
  redis.call('ZADD', X, 0, new_status .. '|' .. node_id)
  if old_status ~= '' then redis.call('ZREM', X, old_status .. '|' .. node_id) end
end

-- create, transition and resume are not idempotent by themselves, so they carry a request id and
-- leave '<request_id>|<previous status>' in the session's `request` field. redis-py sends a
-- command again when its reply was lost (the connection dropped after the server ran it); such a
-- retry finds its own id there and answers as the first attempt did instead of acting twice.
-- Returns the previous status the first attempt saw, or nil when this is not a replay.
local function replay_of(request_id)
  local last = redis.call('HGET', S, 'request')
  if not last then return nil end
  local bar = string.find(last, '|', 1, true)
  if not bar or string.sub(last, 1, bar - 1) ~= request_id then return nil end
  return string.sub(last, bar + 1)
end

local function remember_request(request_id, previous)
  redis.call('HSET', S, 'request', request_id .. '|' .. previous)
end

-- Calls fn with the items of list in slices of at most 1000: unpack() of a very long list
-- overflows Lua's C stack.
local function for_chunks(list, fn)
  for first = 1, #list, 1000 do fn({unpack(list, first, math.min(first + 999, #list))}) end
end

-- Stores n new pending nodes given in ARGV from `first` on, as (node_id, task_id, signature_json)
-- triples ('' for no signature): their records, status index members and signatures, in chunks.
local function store_pending_nodes(first, n)
  local nodes, sigs, members = {}, {}, {}
  for i = 0, n - 1 do
    local base = first + i * 3
    local node_id, task_id, sig = ARGV[base], ARGV[base + 1], ARGV[base + 2]
    nodes[#nodes + 1] = node_id
    nodes[#nodes + 1] = 'pending|0|||' .. task_id .. '||'
    members[#members + 1] = 0
    members[#members + 1] = 'pending|' .. node_id
    if sig ~= '' then
      sigs[#sigs + 1] = node_id
      sigs[#sigs + 1] = sig
    end
    if #nodes >= 1000 or i == n - 1 then
      redis.call('HSET', N, unpack(nodes))
      redis.call('ZADD', X, unpack(members))
      if #sigs > 0 then redis.call('HSET', G, unpack(sigs)) end
      nodes, sigs, members = {}, {}, {}
    end
  end
end

-- Stores the (field, value) pairs of ARGV from `first` on in the sigs hash (a structure's links).
local function store_fields(first)
  for from = first, #ARGV, 1000 do -- pairs stay whole: 1000 is even
    redis.call('HSET', G, unpack(ARGV, from, math.min(from + 999, #ARGV)))
  end
end

local function in_list(value, list, first)
  for i = first, #list do
    if list[i] == value then return true end
  end
  return false
end
