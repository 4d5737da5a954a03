-- claim_code: take one use of a code for (app_id, request_id). A repeat of the same pair
-- returns the recorded session_id without a second use (docs/design.md "A pair across slots" 2).
-- KEYS[1] - code hash ({c:<group>}, store/keys.py)
-- KEYS[2] - claims hash of the code (same tag)
-- KEYS[3..] - tombstone strings of the code's group (same tag), read only when the hash is
--             gone: 'expired' or 'not_found' (none given: 'not_found')
-- ARGV[1] - claim field: app_id .. '\n' .. request_id
-- ARGV[2] - session_id to record for a new claim
-- ARGV[3] - in-flight window, ms: a use claimed this recently may still be given back
-- ARGV[4..] - with KEYS[3..]: fingerprint, window ms, tombstone ms, the keys' windows
--             (see tombstone_expired in _prelude.lua)
-- returns {'not_found'} | {'expired'} | {'used'} | {'busy'} (used up, but a recent claim
--         may still be given back: ask again shortly)
--       | {'ok', runner_id, session_id, uses_left, max_uses, repeat (0/1), first}
-- (field names: issue_code.lua)
local c = redis.call('HMGET', KEYS[1], 'r', 's', 'u', 'm', 'e', 'f')
if not c[1] then
  if #KEYS > 2 and tombstone_expired(3, 4, now_ms()) then return {'expired'} end
  return {'not_found'}
end
-- claims: field -> session_id .. '\t' .. claimed_ms while in flight; session_id once
-- settled (its session opened: settle_claim)
local prev = redis.call('HGET', KEYS[2], ARGV[1])
if prev then
  local sid = string.match(prev, '^([^\t]*)')
  return {'ok', c[1], sid, tonumber(c[3]), tonumber(c[4]), 1, c[6]}
end
local now = now_ms()
if now >= tonumber(c[5]) then return {'expired'} end
local left = tonumber(c[3])
if c[2] == 'used' and left <= 0 then
  -- As if the pairs ran one after another: a claim in flight may still be given back
  -- (its session refused), so the outcome for this one is not known yet.
  local recent = now - tonumber(ARGV[3])
  local claims = redis.call('HVALS', KEYS[2])
  for _, v in ipairs(claims) do
    local at = tonumber(string.match(v, '\t(%d+)$') or '0')
    if at > recent then return {'busy'} end
  end
end
if c[2] ~= 'active' or left <= 0 then return {'used'} end
left = left - 1
if left == 0 then
  redis.call('HSET', KEYS[1], 'u', left, 's', 'used')
else
  redis.call('HSET', KEYS[1], 'u', left)
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. '\t' .. now)
-- the claims live as long as the code: its hash expires at its expiry (issue_code.lua)
redis.call('PEXPIREAT', KEYS[2], tonumber(c[5]))
return {'ok', c[1], ARGV[2], left, tonumber(c[4]), 0, c[6]}
