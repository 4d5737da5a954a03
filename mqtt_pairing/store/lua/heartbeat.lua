-- heartbeat: a runner's heartbeat; refreshes its presence and the last_seen_at of its
-- sessions (PROTOCOL.md "Session object"), without a dedupe key.
-- KEYS[1] - runner hash ({runner:<id>})
-- KEYS[2] - runner sessions hash (same tag)
-- ARGV[1] - session idle TTL, ms
-- returns the number of sessions refreshed
local now = now_ms()
local ttl = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'hb_ms', now)
redis.call('PEXPIRE', KEYS[1], ttl)
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local s = cjson.decode(all[i + 1])
  s['last_seen_at_ms'] = now
  redis.call('HSET', KEYS[2], all[i], cjson.encode(s))
end
if #all > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return #all / 2
