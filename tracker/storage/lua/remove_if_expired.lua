-- remove_if_expired(KEYS=[session, nodes, sigs, events], ARGV=[cutoff_ms])
-- Deletes the session if its real updated_ms is older than cutoff_ms (re-checked here, atomically,
-- so a session written since it was picked as a candidate is kept).
-- Returns {'deleted'} | {'gone'} (expired by TTL already) | {'active', updated_ms}
local updated = redis.call('HGET', S, 'updated_ms')
if not updated then return {'gone'} end
if tonumber(updated) < tonumber(ARGV[1]) then
  redis.call('DEL', S, N, G, E)
  return {'deleted'}
end
return {'active', updated}
