-- nodes_by_status(KEYS=[session, nodes, sigs, events, by_status, children, failures], ARGV=[status, after, limit])
-- A page of the nodes in one status, in node id order: the first `limit` after node id `after`
-- ('' for the first page), read from the status index (common.lua `index`) with their records, in
-- one step, so every node returned is in that status. O(log n + limit), whatever the session's size.
-- Returns {'ok', {node_id, record, ...}, more} | {'not_found'}; more: 1 when a next page exists.
local status, after, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('EXISTS', S) == 0 then return {'not_found'} end
local low = after == '' and '[' .. status .. '|' or '(' .. status .. '|' .. after
local members = redis.call('ZRANGE', X, low, '(' .. status .. '}', 'BYLEX', 'LIMIT', 0, limit + 1) -- '}' follows '|'
local more = #members > limit and 1 or 0
local found = {}
for i = 1, math.min(#members, limit) do
  local node_id = string.sub(members[i], #status + 2)
  found[#found + 1] = node_id
  found[#found + 1] = redis.call('HGET', N, node_id) or ''
end
return {'ok', found, more}
