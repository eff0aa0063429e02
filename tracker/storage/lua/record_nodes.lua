-- record_nodes(KEYS=[session, nodes, sigs, events, by_status, children, failures, (workers, held_1, held_2, ...)],
--              ARGV=[ttl_s, events_maxlen, request_id, details, session_id, event * n])
--   event: 'node_id|status|attempt|task_id|worker|at_ms|started_ms|expect_holder|started_before_ms|held|payload'
--   (one argument per event: only the payload, last, may hold a '|'); status 'progress': a running
--   node's task reports its fraction done (see progress_applies)
-- Applies n node events of one session in order, as n single calls would, in one script run: the
-- session hash is read once and written once, the TTLs refreshed once. Each event is an upsert
-- (the same event twice changes nothing the second time) that moves the counters when the node's
-- status changes; the session starts with its first event and finishes when every node has a
-- result: exactly one call sees `finished`. Rules: states.merge_node_status.
-- started_ms (optional, with a result): the node's start, folded into this event by the handlers'
-- buffer (a running event at started_ms, then the result, without writing the running state).
-- The holder registry is passed outside Cluster only: workers (ZSET of worker process -> last seen
-- ms) and the held sets (SET of "<session_id> <node_id>" one worker process runs) of the events'
-- worker processes; an event's `held` is the number of its worker's set (0: none). A start by that
-- worker adds the node to the set and counts as a sign of life, any other status takes it out (a
-- retry may run elsewhere).
-- expect_holder (the reaper) makes an event conditional: applied only while the node still runs on
-- that holder (and, with started_before_ms, started before then), so two reapers never mark a node
-- twice.
-- The call that ends the session leaves its request_id in the session's `finish_request` field: a
-- retry of that same call (its reply was lost) is answered `finished` again; any other call is not.
-- A late result in an ended session (a node reaped, then its success) re-derives the ended status
-- from the counts (states.rederived_status) and appends a status event; it is not a new end.
-- Callbacks, each told to exactly one call (a retry of that call, same request_id, is told again):
-- `succeeded` when the session became completed for the first time in its life (the field
-- `success_call` remembers the call), `failed_node` the first node that failed for good (failed or
-- lost; `failure_call` remembers '<request_id>|<node_id>').
-- A `linked` session (one with a structure, tracker.structure) follows a node's end through its
-- links in the sigs hash: what Celery will never run is marked `skipped` in this same call
-- (tracker.structure.skips gives the rule), each with a node event after the event that caused it.
-- Returns {'ok', finished, session_values (SESSION_FIELDS order), skipped, details, succeeded, failed_node}
--         | {'not_found'}
--         | {'limit', node_id} (more distinct nodes than node_count: nothing written)
--   skipped: node ids of the conditional events not applied;
--   details (details = '1'): {previous_status, node_record} per event.
local ttl_s, maxlen, request_id, want_details = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1'
local session_id = ARGV[5]
local FIRST = 6
local s = load_session()

local EVENT = '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$'
local events = {}
for i = FIRST, #ARGV do events[#events + 1] = {string.match(ARGV[i], EVENT)} end

if not s then
  -- The session is gone (removed, expired): no worker process runs its nodes any more.
  for _, e in ipairs(events) do
    local held = tonumber(e[10])
    if held > 0 then redis.call('SREM', KEYS[SESSION_KEYS + 1 + held], session_id .. ' ' .. e[1]) end
  end
  return {'not_found'}
end

-- A progress report (status 'progress', payload '{"progress":<fraction>}') counts only while the
-- node runs that very attempt of that task: a late report after its result, or from an attempt that
-- a retry or a resume replaced, changes nothing; nor does one for a node whose task succeeded and
-- that waits for its child sessions (a duplicate delivery still running must not drop what it keeps).
local function progress_applies(f, task_id, attempt)
  if f[1] ~= 'running' or (task_id ~= '' and f[5] ~= '' and f[5] ~= task_id) then return false end
  if string.sub(f[7], 1, 15) == '{"waiting":true' then return false end
  return attempt == '' or tonumber(attempt) >= tonumber(f[2])
end

-- One status change of a node: f (its fields, parse_node order) is updated in place.
local function step(f, incoming, attempt, task_id, worker, payload, at_ms)
  local old_status, old_payload = f[1], f[7]
  if incoming == 'progress' then -- (progress_applies holds) only its payload, and `partial`, move
    f[7] = payload
    count(s, 'running', -1, old_payload)
    count(s, 'running', 1, payload)
    return
  end
  local status = incoming
  if old_status == 'completed' or (TERMINAL_NODE[old_status] and not TERMINAL_NODE[incoming]) then
    status = old_status
  end
  -- states.is_stale_report: a failure, revoke or loss of a task that is no longer the node's (a
  -- resume gave the node a fresh task) changes nothing; a success counts whichever task sends it.
  if incoming ~= 'completed' and TERMINAL_NODE[incoming] and task_id ~= '' and f[5] ~= '' and f[5] ~= task_id then
    status = old_status
  end
  local attempts = tonumber(f[2])
  if attempt ~= '' then
    attempts = math.max(attempts, tonumber(attempt))
  elseif incoming == 'running' and status == 'running' then
    attempts = attempts + 1
  end
  if status ~= 'pending' and attempts < 1 then attempts = 1 end
  f[2] = attempts
  if status == incoming and old_status ~= 'completed' then
    -- otherwise a start after a result, or a duplicate success: only the attempt count moves
    f[1], f[7] = status, payload
    if task_id ~= '' then f[5] = task_id end
    if worker ~= '' then f[6] = worker end
    if status == 'running' then
      f[3], f[4] = at_ms, ''
    elseif TERMINAL_NODE[status] then
      f[4] = at_ms
    end
  end
  if old_status ~= f[1] or old_payload ~= f[7] then -- the same status may move `unneeded` (count)
    if old_status ~= '' then count(s, old_status, -1, old_payload) end
    count(s, f[1], 1, f[7])
  end
  if s.status == 'pending' then set_status(s, 'running', at_ms) end
end

-- First pass: every node's record, read once (a node may come twice in one call), and the node
-- limit checked for the whole call: over it, nothing is written.
local records, fresh, known = {}, 0, nil
for _, e in ipairs(events) do
  local node_id = e[1]
  if records[node_id] == nil then
    records[node_id] = redis.call('HGET', N, node_id)
    if not records[node_id] and e[8] == '' then
      fresh = fresh + 1
      known = known or redis.call('HLEN', N)
      if known + fresh > s.node_count then return {'limit', node_id} end
    end
  end
end

-- Skipping (tracker.structure.skips). A node's status, from this call's records when it has one.
local function status_of(node_id)
  if records[node_id] == nil then records[node_id] = redis.call('HGET', N, node_id) end
  return records[node_id] and string.match(records[node_id], '^[^|]*') or nil
end

local marked = {} -- nodes skipped by the event being applied (their events follow its own)

local function skip(node_id, reason, at_ms)
  local f = parse_node(records[node_id])
  f[1], f[3], f[4], f[6], f[7] = 'skipped', '', at_ms, '', '{"reason":"' .. reason .. '"}'
  records[node_id] = node_text(f)
  redis.call('HSET', N, node_id, records[node_id])
  index(node_id, 'pending', 'skipped')
  count(s, 'skipped', 1, f[7]) -- from pending, which counts nowhere
  marked[#marked + 1] = node_id
end

-- True when every node whose failure calls the error callback has ended without failing. The last
-- tasks of its part (`^` field, a few) are looked at first: every node it handles is read only
-- once they have ended.
local function none_failed(errback)
  for node in string.gmatch(redis.call('HGET', G, '^' .. errback) or '', '%S+') do
    local status = status_of(node)
    if not status or not TERMINAL_NODE[status] or status == 'failed' or status == 'lost' then return false end
  end
  for node in string.gmatch(redis.call('HGET', G, '<' .. errback) or '', '%S+') do
    local status = status_of(node)
    if not status or not TERMINAL_NODE[status] or status == 'failed' or status == 'lost' then return false end
  end
  return true
end

-- What a skipped node leads to is skipped for the same reason as it.
local function skip_after(node_id, status, at_ms)
  local queue, head = {{node_id, status, 'skipped: node ' .. node_id .. ' ' .. status}}, 1 -- ids need no JSON escaping
  while head <= #queue do
    local node, ended, reason = queue[head][1], queue[head][2], queue[head][3]
    head = head + 1
    local links = redis.call('HGET', G, '>' .. node)
    if links then
      local bar = string.find(links, '|', 1, true)
      if ended ~= 'completed' then
        for child in string.gmatch(string.sub(links, 1, bar - 1), '%S+') do
          if status_of(child) == 'pending' then
            skip(child, reason, at_ms)
            queue[#queue + 1] = {child, 'skipped', reason}
          end
        end
      end
      if ended ~= 'failed' and ended ~= 'lost' then
        for errback in string.gmatch(string.sub(links, bar + 1), '%S+') do
          if status_of(errback) == 'pending' and none_failed(errback) then
            skip(errback, ERRBACK_NOT_NEEDED, at_ms)
            queue[#queue + 1] = {errback, 'skipped', ERRBACK_NOT_NEEDED}
          end
        end
      end
    end
  end
end

-- Child sessions (the children hash C, tracker.storage.keys): a node's task that dispatched child
-- sessions ends with them. Each child is told to its parent in two events of the parent's own:
-- 'child_open' (payload 'child_id|attempt|policy'), before the child is created, and 'child_end'
-- (payload 'child_id|end status'), by whoever ended the child. Both are idempotent (a child is
-- opened once, and ends once). Only the latest attempt's children count for the node.
local function node_children(node_id)
  local raw = redis.call('HGET', C, '#' .. node_id)
  if not raw then return nil end
  local at, open, failed = string.match(raw, '^([^|]*)|([^|]*)|(.*)$')
  return {attempt = tonumber(at), open = tonumber(open), failed = failed}
end

local function save_children(node_id, c)
  redis.call('HSET', C, '#' .. node_id, c.attempt .. '|' .. c.open .. '|' .. c.failed)
end

local WAITING = '{"waiting":true'
local children_created = false -- this call made the children hash (its TTL is set below)

-- What a node event means once the node's children are taken into account: the event's own
-- (status, payload, attempt), another (a success that waits for open children stays `running`
-- with its result kept, status 'wait'; one whose child failed fails), or nil when it only moved
-- the children's bookkeeping (nothing happens to the node).
local function with_children(node_id, f, incoming, payload, attempt)
  if incoming == 'child_open' then
    local child, at, policy = string.match(payload, '^([^|]*)|([^|]*)|(.*)$')
    children_created = children_created or redis.call('EXISTS', C) == 0
    if redis.call('HSETNX', C, child, node_id .. '|' .. at .. '|' .. policy .. '|open') == 0 then return nil end
    s.children, s.children_open = s.children + 1, s.children_open + 1
    local c = node_children(node_id)
    if not c or c.attempt < tonumber(at) then c = {attempt = tonumber(at), open = 0, failed = ''} end
    if c.attempt == tonumber(at) then
      c.open = c.open + 1
      save_children(node_id, c)
    end
    return nil
  elseif incoming == 'child_end' then
    local child, ended = string.match(payload, '^([^|]*)|(.*)$')
    local entry = redis.call('HGET', C, child)
    if not entry then return nil end
    local node, at, policy, state = string.match(entry, '^([^|]*)|([^|]*)|([^|]*)|(.*)$')
    if state ~= 'open' then return nil end
    redis.call('HSET', C, child, node .. '|' .. at .. '|' .. policy .. '|' .. ended)
    s.children_open = s.children_open - 1
    local c = node_children(node)
    if not c or c.attempt ~= tonumber(at) then return nil end
    c.open = c.open - 1
    if ended ~= 'completed' and policy ~= 'ignore' and c.failed == '' then c.failed = child .. ' ' .. ended end
    save_children(node, c)
    if c.open > 0 or f[1] ~= 'running' or string.sub(f[7], 1, #WAITING) ~= WAITING then return nil end
    -- The node's task succeeded before: it ends now, with its result or with its child's failure.
    if c.failed ~= '' then return 'failed', '{"reason":"child session ' .. c.failed .. '"}', at end
    local rest = string.sub(f[7], #WAITING + 1)
    return 'completed', rest == '}' and '' or '{' .. string.sub(rest, 2), at
  elseif incoming == 'completed' and s.children > 0 then -- (a session without children reads nothing more)
    local c = node_children(node_id)
    if c and c.attempt == tonumber(attempt ~= '' and attempt or f[2]) then
      if c.open > 0 then return 'wait', payload == '' and WAITING .. '}' or WAITING .. ',' .. string.sub(payload, 2), attempt end
      if c.failed ~= '' then return 'failed', '{"reason":"child session ' .. c.failed .. '"}', attempt end
    end
  end
  return incoming, payload, attempt
end

local finished, skipped, details = '', {}, {}
local first_failed = nil -- the first node of this call that failed for good
local registry, seen = {}, {} -- registry[held] = {member = true (add) | false (remove)}
local applied, last_ms = 0, s.updated_ms
for _, e in ipairs(events) do
  local node_id, incoming, attempt, task_id, worker, at_ms, started_ms = e[1], e[2], e[3], e[4], e[5], e[6], e[7]
  local expect_holder, started_before, held, payload = e[8], e[9], tonumber(e[10]), e[11]
  local member = held > 0 and session_id .. ' ' .. node_id
  if held > 0 and not registry[held] then registry[held] = {} end
  local raw = records[node_id]
  local old = raw and parse_node(raw) or {'', '0', '', '', '', '', ''}
  local old_worker = old[6] -- (old is updated in place below)
  local skip = false
  if expect_holder ~= '' then
    if old[1] ~= 'running' or old[6] ~= expect_holder then
      -- finished, or running elsewhere now (redelivered): the registry entry is stale
      skip = true
      if held > 0 then registry[held][member] = false end
    elseif started_before ~= '' and (old[3] == '' or tonumber(old[3]) >= tonumber(started_before)) then
      skip = true
    end
  end
  local kind = 'node'
  if not skip and (incoming == 'child_open' or incoming == 'child_end' or incoming == 'completed') then
    local effective, effective_payload, effective_attempt = with_children(node_id, old, incoming, payload, attempt)
    if effective and effective ~= incoming then
      kind = effective == 'wait' and 'child' or 'node' -- a node event when the node ends
      incoming, payload, attempt = effective, effective_payload, effective_attempt
      if incoming ~= 'wait' then task_id, worker = '', '' end
    elseif not effective then
      incoming, kind = 'bookkeeping', 'child'
    end
  end
  if incoming == 'bookkeeping' then
    -- a child opened or ended, nothing happened to the node: the counters move, a `child` event
    applied = applied + 1
    emit(s, 'child', at_ms, maxlen, node_id, old[1] ~= '' and old[1] or 'pending')
    if want_details then details[#details + 1] = old[1]; details[#details + 1] = raw or '' end
    if tonumber(at_ms) > tonumber(last_ms) then last_ms = at_ms end
  elseif incoming == 'progress' and not progress_applies(old, task_id, attempt) then
    -- ignored, and not a conditional event: not listed in `skipped`
    if want_details then details[#details + 1] = old[1]; details[#details + 1] = raw or '' end
  elseif skip then
    skipped[#skipped + 1] = node_id
    if want_details then details[#details + 1] = old[1]; details[#details + 1] = raw or '' end
  else
    applied = applied + 1
    local old_status, old_payload = old[1], old[7]
    local new = old -- updated in place
    if started_ms ~= '' and (TERMINAL_NODE[incoming] or incoming == 'wait') then
      step(new, 'running', attempt, task_id, worker, '', started_ms)
    end
    if incoming == 'wait' then
      -- Its task succeeded while children it opened run: it stays running, its result kept, and
      -- no worker holds it any more (the reaper must not take it for lost).
      if new[1] == '' or new[1] == 'pending' then step(new, 'running', attempt, task_id, '', '', at_ms) end
      if new[1] == 'running' then step(new, 'progress', attempt, task_id, worker, payload, at_ms) end
      new[6] = ''
    else
      step(new, incoming, attempt, task_id, worker, payload, at_ms)
    end
    local record = node_text(new)
    if record ~= raw then
      redis.call('HSET', N, node_id, record)
      records[node_id] = record
      index(node_id, old_status, new[1])
      regroup(s, node_id, old_status, old_payload, new[1], new[7], at_ms)
    end
    if held > 0 then
      if new[1] == 'running' and new[6] == worker and worker ~= '' then
        registry[held][member] = true
        seen[worker] = at_ms
      elseif (new[1] ~= 'running' or incoming == 'wait')
        and (old_status == 'running' or old_worker == worker or registry[held][member] ~= nil) then
        -- It may be in the set: it ran here (a cancel ends a running node, and its worker still
        -- reports its end). A node never seen running is not.
        registry[held][member] = false
      end
    end
    if (new[1] == 'failed' or new[1] == 'lost') and old_status ~= 'failed' and old_status ~= 'lost' then
      first_failed = first_failed or node_id
    end
    if s.linked and TERMINAL_NODE[new[1]] and new[1] ~= old_status then skip_after(node_id, new[1], at_ms) end
    local rederived = nil
    if s.status == 'running' then
      local target = finish_status(s)
      if target then
        set_status(s, target, at_ms)
        finished = target
      end
    elseif TERMINAL_SESSION[s.status] then
      local target = rederived_status(s)
      if target ~= s.status then
        set_status(s, target, at_ms)
        rederived = target
      end
    end
    s.progress = derived_progress(s)
    emit(s, incoming == 'progress' and 'progress' or kind, at_ms, maxlen, node_id, new[1])
    for _, other in ipairs(marked) do emit(s, 'node', at_ms, maxlen, other, 'skipped') end
    marked = {}
    if rederived then emit(s, 'status', at_ms, maxlen) end
    if want_details then details[#details + 1] = old_status; details[#details + 1] = record end
    if tonumber(at_ms) > tonumber(last_ms) then last_ms = at_ms end
  end
end

for held, members in pairs(registry) do
  local add, rem = {}, {}
  for member, present in pairs(members) do
    if present then add[#add + 1] = member else rem[#rem + 1] = member end
  end
  for_chunks(add, function(part) redis.call('SADD', KEYS[SESSION_KEYS + 1 + held], unpack(part)) end)
  for_chunks(rem, function(part) redis.call('SREM', KEYS[SESSION_KEYS + 1 + held], unpack(part)) end)
end
local alive = {}
for worker, at_ms in pairs(seen) do alive[#alive + 1] = at_ms; alive[#alive + 1] = worker end
if #alive > 0 then redis.call('ZADD', KEYS[SESSION_KEYS + 1], unpack(alive)) end
if finished ~= '' and request_id ~= '' then
  redis.call('HSET', S, 'finish_request', request_id)
elseif request_id ~= '' and TERMINAL_SESSION[s.status] and redis.call('HGET', S, 'finish_request') == request_id then
  finished = s.status -- a retry of the call that ended the session (its first reply was lost)
end
if applied > 0 then
  s.updated_ms = save_session(s, last_ms)
  touch(ttl_s, known == 0 or children_created, s) -- known == 0: this call created the nodes hash
end
local mark = request_id ~= '' and request_id or '-'
local succeeded, failed_node = '', ''
if s.status == 'completed' then
  local call = redis.call('HGET', S, 'success_call')
  if not call then
    redis.call('HSET', S, 'success_call', mark)
    succeeded = '1'
  elseif request_id ~= '' and call == request_id then
    succeeded = '1'
  end
end
if first_failed or (s.failed > 0 and request_id ~= '') then
  local call = redis.call('HGET', S, 'failure_call')
  if not call then
    if first_failed then
      redis.call('HSET', S, 'failure_call', mark .. '|' .. first_failed)
      failed_node = first_failed
    end
  elseif request_id ~= '' and string.sub(call, 1, #request_id + 1) == request_id .. '|' then
    failed_node = string.sub(call, #request_id + 2)
  end
end
return {'ok', finished, session_values(s), skipped, details, succeeded, failed_node}
