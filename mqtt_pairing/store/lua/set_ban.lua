-- set_ban: an admin ban of an app or runner; a runner's active code is cancelled with it
-- (docs/protocol.md "Runner code": banning a runner cancels its code).
-- KEYS[1] - ban hash ({app:<id>} or {runner:<id>})
-- KEYS[2] - runner hash of the same tag (for an app: any key of the tag, left untouched)
-- ARGV[1] - reason
-- ARGV[2] - who banned
-- ARGV[3] - length, ms (-1: permanent)
-- ARGV[4] - '1' for a runner
-- returns the digest of the runner's cancelled code, or ''
local now = now_ms()
local len = tonumber(ARGV[3])
local until_ms = -1
if len >= 0 then until_ms = now + len end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'reason', ARGV[1], 'by', ARGV[2], 'at_ms', now, 'until_ms', until_ms)
if len >= 0 then redis.call('PEXPIRE', KEYS[1], len) end
local old = ''
if ARGV[4] == '1' then
  old = redis.call('HGET', KEYS[2], 'code') or ''
  redis.call('HDEL', KEYS[2], 'code', 'code_expires_ms', 'code_max', 'code_opened')
end
return old
