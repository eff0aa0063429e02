-- set_progress(KEYS=[session, nodes, sigs, events, by_status, children, failures], ARGV=[progress, now_ms, ttl_s, events_maxlen])
-- Sets an explicit progress on a session that has not ended.
-- Returns {'ok', session_hgetall} | {'not_found'} | {'invalid', current_status}
local progress, now_ms, ttl_s, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local s = load_session()
if not s then return {'not_found'} end
if TERMINAL_SESSION[s.status] then return {'invalid', s.status} end
s.progress = progress
save_session(s, now_ms)
emit(s, 'progress', now_ms, maxlen)
touch(ttl_s, false, s)
return {'ok', redis.call('HGETALL', S)}
