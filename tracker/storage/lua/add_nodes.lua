-- add_nodes(KEYS=[session, nodes, sigs, events, by_status, children, failures],
--           ARGV=[now_ms, ttl_s, events_maxlen, max_node_count, n_nodes, part_json,
--                 (node_id, task_id, signature_json) * n_nodes, (field, value) * m])
-- Grows a session that has not ended by n new pending nodes, in one step: node_count and the nodes
-- together, so no result can end the session between them (the finish rule waits for every node).
-- part_json: the added canvas's tree when it has links (tracker.structure), else ''; the (field,
-- value) pairs are its links. The session's tree (when it has one, or when the part has links)
-- gains the part, as tracker.structure.grown does; the session is then `linked`.
-- Idempotent: when every node is in the session already (the same call again, e.g. by a task
-- delivered again), nothing changes and the reply says which of them are still pending.
-- Returns {'ok', session_values} | {'again', session_values, pending node ids}
--       | {'not_found'} | {'ended', status} | {'exists', node_id} (some of the nodes only)
--       | {'limit', node_count}
local now_ms, ttl_s, maxlen, max_count, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local part = ARGV[6]
local FIRST = 7
local s = load_session()
if not s then return {'not_found'} end

local ids = {}
for i = 0, n - 1 do ids[#ids + 1] = ARGV[FIRST + i * 3] end
local found, first_found, pending = 0, nil, {}
for first = 1, #ids, 1000 do
  local records = redis.call('HMGET', N, unpack(ids, first, math.min(first + 999, #ids)))
  for i, raw in ipairs(records) do
    if raw then
      found = found + 1
      first_found = first_found or ids[first + i - 1]
      if string.match(raw, '^[^|]*') == 'pending' then pending[#pending + 1] = ids[first + i - 1] end
    end
  end
end
if found == n then return {'again', session_values(s), pending} end
if found > 0 then return {'exists', first_found} end
if TERMINAL_SESSION[s.status] then return {'ended', s.status} end
if s.node_count + n > max_count then return {'limit', s.node_count} end

-- The session's tree (tracker.structure.grown), read before the nodes are added: kept when it has
-- one, or when the part has links (the nodes it had, if any, ran side by side).
local tree_json = redis.call('HGET', G, '#tree')
if tree_json or part ~= '' then
  local added
  if part ~= '' then
    added = cjson.decode(part)
  else
    local members = {}
    for _, node_id in ipairs(ids) do members[#members + 1] = {n = node_id} end
    added = {group = members}
  end
  local tree
  if tree_json then
    tree = cjson.decode(tree_json)
  else
    local members = {}
    for _, node_id in ipairs(redis.call('HKEYS', N)) do members[#members + 1] = {n = node_id} end
    tree = #members > 0 and {group = members} or nil
  end
  local function plain_group(t)
    for key in pairs(t) do if key ~= 'group' then return false end end
    return true
  end
  if not tree then
    tree = added
  else
    if not plain_group(tree) then tree = {group = {tree}} end
    local into = tree.group
    for _, member in ipairs(plain_group(added) and added.group or {added}) do into[#into + 1] = member end
  end
  redis.call('HSET', G, '#tree', cjson.encode(tree))
  store_fields(FIRST + n * 3)
  redis.call('HSET', S, 'linked', '1')
end

store_pending_nodes(FIRST, n)

s.node_count = s.node_count + n
redis.call('HSET', S, 'node_count', s.node_count)
s.progress = derived_progress(s)
s.updated_ms = save_session(s, now_ms)
emit(s, 'added', now_ms, maxlen)
touch(ttl_s, false, s)
return {'ok', session_values(s)}
