-- record_node(KEYS=[session, nodes, sigs, events, (held, workers)],
--             ARGV=[node_id, status, attempt, task_id, worker, payload, now_ms, ttl_s, events_maxlen,
--                   expect_holder, started_before_ms, held_member, request_id])
-- Upserts one node event (idempotent: the same event twice changes nothing the second time), moves
-- the counters when the node's status changes, starts a pending session and finishes a running one
-- when every node has a result: exactly one caller sees `finished`. Rules: states.merge_node_status.
-- held (SET of "<session_id> <node_id>" a worker process runs) and workers (ZSET of worker process
-- -> last seen ms) are passed outside Cluster only: a start adds the node to its holder's set and
-- counts as a sign of life, any other status takes it out (a retry may run elsewhere). expect_holder (the reaper) makes the event
-- conditional: applied only while the node still runs on that holder (and, with
-- started_before_ms, started before then), so two reapers never mark a node twice.
-- The event that ends the session leaves its request_id in the session's `finish_request` field: a
-- retry of that same call (its reply was lost) is answered `finished` again; any other call is not.
-- Returns {'ok', session_hgetall, node_record, old_status, finished} | {'not_found'} | {'limit'} | {'skip'}
local node_id, incoming, attempt, task_id, worker, payload = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local now_ms, ttl_s, maxlen = ARGV[7], ARGV[8], ARGV[9]
local expect_holder, started_before, held_member = ARGV[10] or '', ARGV[11] or '', ARGV[12] or ''
local request_id = ARGV[13] or ''
local s = load_session()
if not s then return {'not_found'} end

local raw = redis.call('HGET', N, node_id)
local old
if raw then
  old = parse_node(raw)
else
  if redis.call('HLEN', N) >= s.node_count then return {'limit'} end
  old = {'', '0', '', '', '', '', ''}
end
local old_status = old[1]
if expect_holder ~= '' then
  if old_status ~= 'running' or old[6] ~= expect_holder then
    -- finished, or running elsewhere now (redelivered): the registry entry is stale
    if KEYS[5] and held_member ~= '' then redis.call('SREM', KEYS[5], held_member) end
    return {'skip'}
  end
  if started_before ~= '' and (old[3] == '' or tonumber(old[3]) >= tonumber(started_before)) then
    return {'skip'}
  end
end

-- states.merge_node_status
local status = incoming
if old_status == 'completed' or (TERMINAL_NODE[old_status] and not TERMINAL_NODE[incoming]) then
  status = old_status
end
-- states.is_stale_report: a failure, revoke or loss of a task that is no longer the node's (a
-- resume gave the node a fresh task) changes nothing; a success counts whichever task sends it.
if incoming ~= 'completed' and TERMINAL_NODE[incoming] and task_id ~= '' and old[5] ~= '' and old[5] ~= task_id then
  status = old_status
end

local attempts = tonumber(old[2])
if attempt ~= '' then
  attempts = math.max(attempts, tonumber(attempt))
elseif incoming == 'running' and status == 'running' then
  attempts = attempts + 1
end
if status ~= 'pending' and attempts < 1 then attempts = 1 end

local new
if status ~= incoming or old_status == 'completed' then
  -- a start after a result, or a duplicate success: only the attempt count moves
  new = {old[1], attempts, old[3], old[4], old[5], old[6], old[7]}
else
  new = {status, attempts, old[3], old[4], old[5], old[6], payload}
  if task_id ~= '' then new[5] = task_id end
  if worker ~= '' then new[6] = worker end
  if status == 'running' then
    new[3], new[4] = now_ms, ''
  elseif TERMINAL_NODE[status] then
    new[4] = now_ms
  end
end
local record = node_text(new)
redis.call('HSET', N, node_id, record)

if old_status ~= new[1] then
  if old_status ~= '' then count(s, old_status, -1) end
  count(s, new[1], 1)
end

if KEYS[5] and held_member ~= '' then
  if new[1] == 'running' and new[6] == worker then
    redis.call('SADD', KEYS[5], held_member)
    redis.call('ZADD', KEYS[6], now_ms, worker)
  elseif new[1] ~= 'running' then
    redis.call('SREM', KEYS[5], held_member)
  end
end

local finished = ''
if s.status == 'pending' then set_status(s, 'running', now_ms) end
if s.status == 'running' then
  local target = finish_status(s)
  if target then
    set_status(s, target, now_ms)
    finished = target
    if request_id ~= '' then redis.call('HSET', S, 'finish_request', request_id) end
  end
elseif request_id ~= '' and TERMINAL_SESSION[s.status] and redis.call('HGET', S, 'finish_request') == request_id then
  finished = s.status
end
s.progress = derived_progress(s)
save_session(s, now_ms)
emit(s, 'node', now_ms, maxlen, node_id, new[1])
touch(ttl_s)
return {'ok', redis.call('HGETALL', S), record, old_status, finished}
