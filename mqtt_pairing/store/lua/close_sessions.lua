-- close_sessions: close sessions of one runner and return them, closed.
-- KEYS[1] - runner sessions hash ({runner:<id>})
-- KEYS[2] - runner outbox stream (same tag): session.closed for each closed session
-- ARGV[1] - 'session' | 'app' | 'all'
-- ARGV[2] - the session_id or app_id ('' for all)
-- ARGV[3] - app_id the session must belong to ('' any): an app may close only its own
-- ARGV[4] - closed_reason
-- returns {closed session JSON list (state 'closed', closed_reason, closed_at_ms),
--          the outbox entries this call wrote (see outbox_closing)}
local closed, closing = {}, {}
local now = now_ms()
local function close(id, json)
  local s = cjson.decode(json)
  if ARGV[3] ~= '' and s['app_id'] ~= ARGV[3] then return end
  redis.call('HDEL', KEYS[1], id)
  closing[id] = true
  s['state'] = 'closed'
  s['closed_reason'] = ARGV[4]
  s['closed_at_ms'] = now
  local json_closed = cjson.encode(s)
  closed[#closed + 1] = json_closed
  outbox_add(KEYS[2], 'session.closed', json_closed, '{}', now)
end
if ARGV[1] == 'session' then
  local json = redis.call('HGET', KEYS[1], ARGV[2])
  if json then close(ARGV[2], json) end
else
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if ARGV[1] == 'all' or cjson.decode(all[i + 1])['app_id'] == ARGV[2] then
      close(all[i], all[i + 1])
    end
  end
end
if #closed == 0 then return {closed, {}} end
return {closed, outbox_closing(KEYS[2], closing)}
