-- begin_request: replay check, admin ban, penalty and request rate of one identity, and
-- the pending mark of the request (docs/protocol.md "Idempotency", "App pair" checks 1-3).
-- All keys carry the identity's tag ({app:<id>} or {runner:<id>}).
-- KEYS[1] - dedupe hash of (kind, id, op, request_id)
-- KEYS[2] - ban hash of the identity
-- KEYS[3] - allowlist string of the identity
-- KEYS[4] - limit hash of the identity (penalty_until_ms)
-- KEYS[5] - request-rate sorted set of the identity
-- ARGV[1] - payload hash (hex)
-- ARGV[2] - pending lease, ms (a copy arriving later waits this long before taking over)
-- ARGV[3] - dedupe TTL, ms (0: the op has no idempotency)
-- ARGV[4] - '1' to check the admin ban
-- ARGV[5] - '1' to check the automatic penalty
-- ARGV[6] - request limit in the window (0: none)
-- ARGV[7] - request window, ms
-- ARGV[8] - unique member for this request in the rate set
-- returns {'replay', reply} | {'pending'} | {'mismatch'} | {'banned', retry_ms (-1: permanent)}
--       | {'limited', retry_ms} | {'ok', allowlisted (0/1), now_ms, takeover (0/1)}
local now = now_ms()
local dedupe_ttl = tonumber(ARGV[3])
local takeover = 0
if dedupe_ttl > 0 then
  local d = redis.call('HMGET', KEYS[1], 'h', 'st', 'lease', 'reply')
  if d[1] then
    if d[1] ~= ARGV[1] then return {'mismatch'} end
    if d[2] == 'done' then return {'replay', d[4]} end
    if tonumber(d[3]) > now then return {'pending'} end
    takeover = 1
  end
end
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then
  local u = tonumber(redis.call('HGET', KEYS[2], 'until_ms') or '-1')
  if u < 0 then return {'banned', -1} end
  if u > now then return {'banned', u - now} end
end
local allow = redis.call('EXISTS', KEYS[3])
if takeover == 0 then
  if ARGV[5] == '1' then
    local pu = tonumber(redis.call('HGET', KEYS[4], 'penalty_until_ms') or '0')
    if pu > now then return {'limited', pu - now} end
  end
  local lim = tonumber(ARGV[6])
  if lim > 0 then
    local win = tonumber(ARGV[7])
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - win)
    if redis.call('ZCARD', KEYS[5]) >= lim then
      local oldest = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
      return {'limited', tonumber(oldest[2]) + win - now}
    end
    redis.call('ZADD', KEYS[5], now, ARGV[8])
    redis.call('PEXPIRE', KEYS[5], win)
  end
end
if dedupe_ttl > 0 then
  redis.call('HSET', KEYS[1], 'h', ARGV[1], 'st', 'pending', 'lease', now + tonumber(ARGV[2]))
  redis.call('PEXPIRE', KEYS[1], dedupe_ttl)
end
return {'ok', allow, now, takeover}
