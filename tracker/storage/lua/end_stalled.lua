-- end_stalled(KEYS=[session, nodes, sigs, events, by_status, children, failures], ARGV=[cutoff_ms, reaped_ms, now_ms, ttl_s, events_maxlen, payload])
-- A session left waiting for a message that no broker will deliver (kombu's Redis transport loses
-- a message it popped when its worker is killed before recording it as unacknowledged): it has not
-- ended, it existed when a dead worker was reaped (reaped_ms), nothing of it runs, and nothing
-- changed since cutoff_ms (neither a write nor a heartbeat of a worker running one of its nodes).
-- Every node without a result then becomes `lost` (payload: its reason), and the session ends by
-- the finish rule. A node whose task runs after all is counted then (a late result).
-- Returns {'stalled', finished, session_values (SESSION_FIELDS order), failed_node} | {'gone'}
--       | {'ended'} | {'active', last_ms}; failed_node: set when this is the session's first
--         failure for good (its on_failure callback, see record_nodes).
local cutoff, reaped, now_ms, ttl_s, maxlen, payload = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local s = load_session()
if not s then return {'gone'} end
if TERMINAL_SESSION[s.status] then return {'ended'} end
local last = math.max(tonumber(s.updated_ms), tonumber(redis.call('HGET', S, 'alive_ms') or '0') or 0)
if last >= tonumber(cutoff) or s.running + s.retrying > 0 or tonumber(s.created_ms) >= tonumber(reaped) then
  return {'active', string.format('%d', last)}
end
local all = redis.call('HGETALL', N)
local first = nil
for i = 1, #all, 2 do
  local f = parse_node(all[i + 1])
  if not TERMINAL_NODE[f[1]] then
    local status = f[1]
    count(s, f[1], -1, f[7])
    count(s, 'lost', 1)
    regroup(s, all[i], f[1], f[7], 'lost', payload, now_ms)
    f[1], f[4], f[7] = 'lost', now_ms, payload
    redis.call('HSET', N, all[i], node_text(f))
    index(all[i], status, 'lost')
    first = first or all[i]
  end
end
if not first then return {'active', string.format('%d', last)} end -- its missing nodes were never recorded
s.progress = derived_progress(s)
if s.status == 'pending' then set_status(s, 'running', now_ms) end
local finished = finish_status(s)
if finished then set_status(s, finished, now_ms) end
save_session(s, now_ms)
emit(s, 'status', now_ms, maxlen)
touch(ttl_s, false, s)
local failed_node = ''
if not redis.call('HGET', S, 'failure_call') then
  redis.call('HSET', S, 'failure_call', '-|' .. first)
  failed_node = first
end
return {'stalled', finished or '', session_values(s), failed_node}
