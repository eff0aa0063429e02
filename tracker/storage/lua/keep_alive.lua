-- keep_alive(KEYS=[session, nodes, sigs, events, by_status, children, failures], ARGV=[now_ms, ttl_s])
-- A heartbeat of a worker process that runs nodes of this session: while the session has not ended,
-- its keys live at least ttl_s more and cleanup counts it as active from now_ms (`alive_ms`), so a
-- node may run longer than the session timeout. updated_ms is left alone: nothing changed.
-- Returns 1 when kept alive, 0 when the session is gone or has ended.
local status = redis.call('HGET', S, 'status')
if not status or TERMINAL_SESSION[status] then return 0 end
redis.call('HSET', S, 'alive_ms', ARGV[1])
touch(ARGV[2], false)
return 1
