-- reserve_budget: take one unit of the global failure budget before a code lookup, so that
-- concurrent guesses cannot overshoot it (docs/protocol.md "Default limits"). A success gives
-- the unit back (ZREM of the member).
-- KEYS[1] - budget sorted set of one shard ({global:<n>}): member -> when reserved (ms). It
--           has no TTL: it never holds more than the shard's units, as units past the
--           window are trimmed whenever it is full (docs/design.md "Redis keys").
-- ARGV[1] - member: unique per request (the same member again is already reserved)
-- ARGV[2] - units allowed in this shard per window
-- ARGV[3] - window, ms
-- ARGV[4] - 'reserve' | 'peek' (check only)
-- returns {1, 1} (reserved now) | {1, 0} (already reserved, or peek) | {0, retry_ms}
-- Costs ZCARD and, to reserve, TIME and ZADD; a full set also ZREMRANGEBYSCORE and ZCARD.
local lim = tonumber(ARGV[2])
local now
if redis.call('ZCARD', KEYS[1]) >= lim then
  now = now_ms()
  local win = tonumber(ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - win)
  if redis.call('ZCARD', KEYS[1]) >= lim then
    if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {1, 0} end
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, tonumber(oldest[2]) + win - now}
  end
end
if ARGV[4] ~= 'reserve' then return {1, 0} end
-- NX: the same member again keeps its first reservation (and is not this call's)
return {1, redis.call('ZADD', KEYS[1], 'NX', now or now_ms(), ARGV[1])}
