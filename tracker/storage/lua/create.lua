-- create(KEYS=[session, nodes, sigs, events, by_status, children, failures,
--              (created_index, expiry_index, children_index, paths_index, filed_index, tag_index...)],
--        ARGV=[session_id, canvas_path, node_count, now_ms, metadata_json, ttl_s, events_maxlen, n_nodes,
--              request_id, parent, ended_ttl_s, tags, path_member, filed, (node_id, task_id, signature_json) *
--              n_nodes, (field, value) * m])
-- Creates a pending session with its known nodes. The index keys are passed only outside Cluster:
-- the children index is written only for a child session; the paths index gets path_member
-- (tracker.storage.keys.path_member), its tags' indexes list it by creation time, and the filed
-- index remembers both (`filed`), so that they leave with the session. parent:
-- 'session_id|node_id' of the node whose task opened it, '' for none; a child is watched in the
-- children index until its end was told to its parent (tracker.celery.children). ended_ttl_s: how
-- long its keys live once it has ended (TRACKER_FINISHED_TTL_S). tags: its tags, space-separated.
-- The (field, value) pairs after the nodes are the session's structure (tracker.structure), kept in
-- the sigs hash; with them the session is `linked`: record_nodes follows its links.
-- A retry of the same request (same request_id) answers 'ok' again and changes nothing.
-- Returns {'ok'} | {'exists'}
local sid, canvas_path, node_count, now_ms, metadata = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ttl_s, maxlen, n_nodes, request_id, parent = ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9], ARGV[10]
local ended_ttl, tags, path_member, filed = ARGV[11], ARGV[12], ARGV[13], ARGV[14]
local FIRST = 15
if redis.call('EXISTS', S) == 1 then
  if replay_of(request_id) then return {'ok'} end
  return {'exists'}
end
redis.call('HSET', S, 'canvas_path', canvas_path, 'node_count', node_count, 'status', 'pending', 'progress', '0',
           'completed', 0, 'failed', 0, 'running', 0, 'lost', 0, 'cancelled', 0, 'skipped', 0, 'retrying', 0, 'created_ms', now_ms,
           'updated_ms', now_ms, 'started_ms', '', 'finished_ms', '', 'metadata', metadata, 'finish_request', '',
           'parent', parent, 'ended_ttl', ended_ttl, 'tags', tags)
remember_request(request_id, '')
-- In chunks: unpack() of a very long list overflows Lua's C stack.
store_pending_nodes(FIRST, n_nodes)
local first_field = FIRST + n_nodes * 3
if #ARGV >= first_field then
  store_fields(first_field)
  redis.call('HSET', S, 'linked', '1')
end
local s = load_session()
emit(s, 'created', now_ms, maxlen)
touch(ttl_s, true)
local INDEXES = SESSION_KEYS + 1
if KEYS[INDEXES] then
  redis.call('ZADD', KEYS[INDEXES], now_ms, sid)
  redis.call('ZADD', KEYS[INDEXES + 1], now_ms, sid)
  if parent ~= '' then
    local bar = string.find(parent, '|', 1, true)
    local watched = sid .. ' ' .. string.sub(parent, 1, bar - 1) .. ' ' .. string.sub(parent, bar + 1)
    redis.call('ZADD', KEYS[INDEXES + 2], now_ms, watched)
  end
  redis.call('ZADD', KEYS[INDEXES + 3], 0, path_member)
  redis.call('HSET', KEYS[INDEXES + 4], sid, filed)
  for i = INDEXES + 5, #KEYS do redis.call('ZADD', KEYS[i], now_ms, sid) end
end
return {'ok'}
