-- close_sessions: close sessions of one runner and return them, closed.
-- KEYS[1] - runner sessions hash ({runner:<id>})
-- ARGV[1] - 'session' | 'app' | 'all'
-- ARGV[2] - the session_id or app_id ('' for all)
-- ARGV[3] - app_id the session must belong to ('' any): an app may close only its own
-- ARGV[4] - closed_reason
-- returns a list of session JSON (state 'closed', closed_reason and closed_at_ms set)
local closed = {}
local now = now_ms()
local function close(id, json)
  local s = cjson.decode(json)
  if ARGV[3] ~= '' and s['app_id'] ~= ARGV[3] then return end
  redis.call('HDEL', KEYS[1], id)
  s['state'] = 'closed'
  s['closed_reason'] = ARGV[4]
  s['closed_at_ms'] = now
  closed[#closed + 1] = cjson.encode(s)
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
return closed
