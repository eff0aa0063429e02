-- remove_if_expired(KEYS=[session, nodes, sigs, events, by_status, children], ARGV=[cutoff_ms])
-- Deletes the session if its last sign of life is older than cutoff_ms: its real updated_ms, or
-- alive_ms (a heartbeat of a worker running one of its nodes), re-checked here atomically, so a
-- session written or kept alive since it was picked as a candidate is kept.
-- Returns {'deleted'} | {'gone'} (expired by TTL already) | {'active', last_ms}
local v = redis.call('HMGET', S, 'updated_ms', 'alive_ms')
if not v[1] then return {'gone'} end
local last = math.max(tonumber(v[1]), tonumber(v[2]) or 0)
if last < tonumber(ARGV[1]) then
  redis.call('DEL', S, N, G, E, X, C)
  return {'deleted'}
end
return {'active', string.format('%d', last)}
