-- issue_code: create a new code under its digest, unless the digest is taken.
-- KEYS[1] - code hash ({code:<digest>})
-- ARGV[1] - runner_id
-- ARGV[2] - max uses
-- ARGV[3] - TTL, ms
-- ARGV[4] - tombstone, ms (CODE_EXPIRED is told apart from CODE_NOT_FOUND this long)
-- ARGV[5] - first character of the code (for the masked form)
-- ARGV[6] - fingerprint of the digest (for the masked form)
-- returns {0} (collision: draw another code) | {1, created_ms, expires_ms}
if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
local now = now_ms()
local expires = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'runner_id', ARGV[1], 'state', 'active', 'max_uses', ARGV[2],
  'uses_left', ARGV[2], 'created_ms', now, 'expires_ms', expires, 'first', ARGV[5], 'fp', ARGV[6])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + tonumber(ARGV[4]))
return {1, now, expires}
