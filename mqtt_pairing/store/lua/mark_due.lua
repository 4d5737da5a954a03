-- mark_due: put a member in a due set ({global:<n>}) to be handled after `delay` ms,
-- keeping an earlier due time if it has one (outbox marks, session expiry deadlines).
-- KEYS[1] - due sorted set
-- ARGV[1] - member
-- ARGV[2] - delay, ms (0: due now); ignored when ARGV[3] is given
-- ARGV[3] - absolute due time, ms ('' none)
-- ARGV[4] - '1' to replace the due time even if later
-- ARGV[5] - TTL of the set, ms, refreshed on every mark ('' or absent: none). The outbox
--           marks have one: an outbox whose mark lapsed is still found by the SCAN at start.
-- returns the due time, ms (Redis time is read only for a delay)
local due
if ARGV[3] ~= '' then due = tonumber(ARGV[3]) else due = now_ms() + tonumber(ARGV[2]) end
if ARGV[5] and ARGV[5] ~= '' then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5])) end
if ARGV[4] ~= '1' then
  local cur = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if cur and due >= tonumber(cur) then return tonumber(cur) end
end
redis.call('ZADD', KEYS[1], due, ARGV[1])
return due
