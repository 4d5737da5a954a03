-- reserve_budget: take one unit of the global failure budget before a code lookup, so that
-- concurrent guesses cannot overshoot it (docs/protocol.md "Default limits"). A success gives
-- the unit back (ZREM of the member).
-- KEYS[1] - budget sorted set of one shard ({global:<n>})
-- ARGV[1] - member: unique per request (the same member again is already reserved)
-- ARGV[2] - units allowed in this shard per window
-- ARGV[3] - window, ms
-- ARGV[4] - 'reserve' | 'peek' (check only)
-- returns {1, 1} (reserved now) | {1, 0} (already reserved, or peek) | {0, retry_ms}
local now = now_ms()
local win = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - win)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {1, 0} end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(oldest[2]) + win - now}
end
if ARGV[4] == 'reserve' then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], win)
  return {1, 1}
end
return {1, 0}
