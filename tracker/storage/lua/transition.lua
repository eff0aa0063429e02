-- transition(KEYS=[session, nodes, sigs, events, by_status, children, failures],
--            ARGV=[target, now_ms, ttl_s, events_maxlen, request_id, allowed_from...])
-- Compare-and-set of the session status; the allowed from-states come from states.VALID_TRANSITIONS.
-- Cancelling marks every node without a result `cancelled`. A retry of the same request (same
-- request_id) answers as the first attempt did and changes nothing.
-- Returns {'ok', session_hgetall, previous_status} | {'not_found'} | {'invalid', current_status}
local target, now_ms, ttl_s, maxlen, request_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local s = load_session()
if not s then return {'not_found'} end
local previous = s.status
local replayed = replay_of(request_id)
if replayed then return {'ok', redis.call('HGETALL', S), replayed} end
if not in_list(previous, ARGV, 6) then return {'invalid', previous} end

if target == 'cancelled' then
  local all = redis.call('HGETALL', N)
  for i = 1, #all, 2 do
    local f = parse_node(all[i + 1])
    if not TERMINAL_NODE[f[1]] then
      index(all[i], f[1], 'cancelled')
      count(s, f[1], -1, f[7])
      count(s, 'cancelled', 1)
      f[1], f[4], f[7] = 'cancelled', now_ms, '{"reason":"session cancelled"}'
      redis.call('HSET', N, all[i], node_text(f))
    end
  end
  s.progress = derived_progress(s)
end
set_status(s, target, now_ms)
save_session(s, now_ms)
remember_request(request_id, previous)
emit(s, 'status', now_ms, maxlen)
touch(ttl_s, false, s)
return {'ok', redis.call('HGETALL', S), previous}
