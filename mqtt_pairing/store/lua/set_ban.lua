-- set_ban: the admin's changes to the limit hash of an app or runner (see limit_keep in
-- _prelude.lua): a ban, lifting it (and the automatic penalty), the allowlist. A runner's
-- active code is cancelled with its ban (docs/protocol.md "Runner code").
-- KEYS[1] - limit hash ({app:<id>} or {runner:<id>})
-- KEYS[2] - runner hash of the same tag (for an app: any key of the tag, left untouched)
-- ARGV[1] - 'ban' | 'unban' | 'allow' | 'disallow'
-- 'ban':   ARGV[2] reason, ARGV[3] who banned, ARGV[4] length, ms (-1: permanent),
--          ARGV[5] '1' for a runner; returns the digest of the runner's cancelled code, or ''
-- 'unban': ARGV[2] '1' to lift the automatic penalty too (its strikes and failure log);
--          returns {a ban was in force (0/1), a penalty was in force (0/1)}
-- 'allow', 'disallow': returns 1 if it changed anything, else 0
local now = now_ms()
local op = ARGV[1]
local g = redis.call('HMGET', KEYS[1], 'ban_until_ms', 'allow', 'keep', 'penalty_until_ms')
local ban_until, allow, keep = g[1], g[2], g[3]
local out
if op == 'ban' then
  local len = tonumber(ARGV[4])
  ban_until = '-1'
  if len >= 0 then
    ban_until = tostring(now + len)
    keep = tostring(math.max(tonumber(keep or '0'), now + len))
  end
  redis.call('HSET', KEYS[1], 'ban_reason', ARGV[2], 'ban_by', ARGV[3], 'ban_at_ms', now,
    'ban_until_ms', ban_until, 'keep', keep or 0)
  out = ''
  if ARGV[5] == '1' then
    out = redis.call('HGET', KEYS[2], 'code') or ''
    redis.call('HDEL', KEYS[2], 'code', 'code_expires_ms', 'code_max', 'code_opened')
  end
elseif op == 'unban' then
  local had_ban = ban_until and (ban_until == '-1' or tonumber(ban_until) > now)
  local had_pen = tonumber(g[4] or '0') > now
  if ban_until then
    redis.call('HDEL', KEYS[1], 'ban_reason', 'ban_by', 'ban_at_ms', 'ban_until_ms')
    ban_until = nil
  end
  if had_pen and ARGV[2] == '1' then
    redis.call('HDEL', KEYS[1], 'strikes', 'penalty_until_ms', 'last_penalty_end_ms',
      'penalty_ms', 'fl')
  end
  out = {had_ban and 1 or 0, had_pen and 1 or 0}
elseif op == 'allow' or op == 'disallow' then
  local want = op == 'allow'
  if (allow == '1') == want then return 0 end
  if want then
    allow = '1'
    redis.call('HSET', KEYS[1], 'allow', '1')
  else
    allow = nil
    redis.call('HDEL', KEYS[1], 'allow')
  end
  out = 1
else
  return redis.error_reply('unknown op')
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  local k = tonumber(keep or '0')
  limit_ttl(KEYS[1], k > now and k or nil, limit_persistent(ban_until, allow))
end
return out
