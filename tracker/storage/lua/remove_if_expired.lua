-- remove_if_expired(KEYS=[session, nodes, sigs, events, by_status, children, failures],
--                   ARGV=[now_ms, timeout_ms, ended_ttl_ms])
-- Deletes the session once it has outlived its retention: a session that has not ended
-- timeout_ms after its last sign of life (its real updated_ms, or alive_ms: a heartbeat of a worker
-- running one of its nodes), an ended one ended_ttl_ms after its last change. Re-checked here
-- atomically, so a session written or kept alive since it was picked as a candidate is kept.
-- Returns {'deleted'} | {'gone'} (expired by TTL already)
--       | {'active', score}: when it expires less the shorter retention (its cleanup index score).
local now_ms, timeout_ms, ended_ttl_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', S, 'updated_ms', 'alive_ms', 'status')
if not v[1] then return {'gone'} end
local last = math.max(tonumber(v[1]), tonumber(v[2]) or 0)
local keep_ms = TERMINAL_SESSION[v[3]] and ended_ttl_ms or timeout_ms
if last + keep_ms < now_ms then
  redis.call('DEL', S, N, G, E, X, C, F)
  return {'deleted'}
end
return {'active', string.format('%d', last + keep_ms - math.min(timeout_ms, ended_ttl_ms))}
