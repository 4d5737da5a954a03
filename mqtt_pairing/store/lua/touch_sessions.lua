-- touch_sessions: list a runner's active sessions (all, or those of one app) and refresh
-- their last_seen_at (docs/protocol.md: a request that lists a session refreshes it).
-- KEYS[1] - runner sessions hash ({runner:<id>})
-- KEYS[2] - runner hash (same tag)
-- ARGV[1] - TTL of the runner's keys, ms (idle TTL plus a margin, see open_session.lua)
-- ARGV[2] - app_id filter ('' all)
-- returns a list of session JSON
local now = now_ms()
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local s = cjson.decode(all[i + 1])
  if ARGV[2] == '' or s['app_id'] == ARGV[2] then
    s['last_seen_at_ms'] = now
    local json = cjson.encode(s)
    redis.call('HSET', KEYS[1], all[i], json)
    out[#out + 1] = json
  end
end
if #out > 0 then
  local ttl = tonumber(ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
return out
