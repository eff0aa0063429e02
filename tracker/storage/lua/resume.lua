-- resume(KEYS=[session, nodes, sigs, events, by_status, children, failures, (expiry_index)],
--        ARGV=[retry_failed, task_id_base, now_ms, ttl_s, events_maxlen, request_id, n_chosen, chosen...,
--              allowed_from...])
-- Takes the session back to running (its next run: the `run` field counts them) and resets to
-- pending every node that has not completed (failed ones only when retry_failed is '1'). With
-- nothing to reset and a result for every node, the session ends at once with the status its
-- counts give (never `running`). Completed nodes are never touched. Each reset node
-- gets a fresh task id, task_id_base followed by 12 hex digits of a counter (a revoked id stays
-- revoked in the workers' memory, so a re-sent task must not reuse it). A retry of the same request
-- (same request_id) changes nothing and answers with the first attempt's previous status and the
-- nodes still pending (those it reset, unless they have moved on since).
-- With n_chosen >= 0, the chosen nodes are exactly those to reset (a plan made from the session's
-- structure; retry_failed is not consulted): if one of them has completed since, nothing changes.
-- Returns {'ok', session_hgetall, previous_status, {node_id, task_id, signature_json}...}
--       | {'not_found'} | {'invalid', current_status} | {'changed'} (a chosen node completed)
local retry_failed, task_id_base, now_ms, ttl_s, maxlen = ARGV[1] == '1', ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local request_id = ARGV[6]
local n_chosen = tonumber(ARGV[7])
local ALLOWED = 8 + math.max(n_chosen, 0)
local s = load_session()
if not s then return {'not_found'} end
local previous = s.status

local reset = {}
local all = redis.call('HGETALL', N)
local replayed = replay_of(request_id)
if replayed then
  for i = 1, #all, 2 do
    local f = parse_node(all[i + 1])
    if f[1] == 'pending' then
      reset[#reset + 1] = all[i]
      reset[#reset + 1] = f[5]
      reset[#reset + 1] = redis.call('HGET', G, all[i]) or ''
    end
  end
  return {'ok', redis.call('HGETALL', S), replayed, reset}
end
if not in_list(previous, ARGV, ALLOWED) then return {'invalid', previous} end

local candidates = {} -- {node_id, record}
if n_chosen >= 0 then
  for i = 8, ALLOWED - 1 do
    local raw = redis.call('HGET', N, ARGV[i])
    if raw then
      if parse_node(raw)[1] == 'completed' then return {'changed'} end
      candidates[#candidates + 1] = {ARGV[i], raw}
    end
  end
else
  for i = 1, #all, 2 do
    local status = parse_node(all[i + 1])[1]
    if status ~= 'completed' and (status ~= 'failed' or retry_failed) then
      candidates[#candidates + 1] = {all[i], all[i + 1]}
    end
  end
end
for _, node in ipairs(candidates) do
  local f = parse_node(node[2])
  count(s, f[1], -1, f[7])
  regroup(s, node[1], f[1], f[7], 'pending', '', now_ms)
  local task_id = string.format('%s%012x', task_id_base, #reset / 3 + 1)
  redis.call('HSET', N, node[1], node_text({'pending', f[2], '', '', task_id, '', ''}))
  redis.call('HDEL', C, '#' .. node[1]) -- its run again waits only for the children it opens
  index(node[1], f[1], 'pending')
  reset[#reset + 1] = node[1]
  reset[#reset + 1] = task_id
  reset[#reset + 1] = redis.call('HGET', G, node[1]) or ''
end
s.progress = derived_progress(s)
local ended = #reset == 0 and finish_status(s)
if ended then
  -- Nothing to re-send and every node has a result: the session ends at once with that status.
  set_status(s, ended, now_ms)
else
  set_status(s, 'running', now_ms)
  restart_rate(s, now_ms)
  redis.call('HSET', S, 'run', s.run + 1)
end
save_session(s, now_ms)
remember_request(request_id, previous)
-- Running again: cleanup measures its inactivity from now (an ended session's score in the cleanup
-- index was moved on to its longer retention). The index is passed outside Cluster only.
if KEYS[SESSION_KEYS + 1] and not ended then
  redis.call('ZADD', KEYS[SESSION_KEYS + 1], now_ms, string.match(S, '{([^}]*)}')) -- the id of the session key
end
emit(s, 'status', now_ms, maxlen)
touch(ttl_s, false, s)
return {'ok', redis.call('HGETALL', S), previous, reset}
