-- mark_due: put a member in a due set ({global:<n>}) to be handled after `delay` ms,
-- keeping an earlier due time if it has one (outbox marks, session expiry deadlines).
-- KEYS[1] - due sorted set
-- ARGV[1] - member
-- ARGV[2] - delay, ms (0: due now); ignored when ARGV[3] is given
-- ARGV[3] - absolute due time, ms ('' none)
-- ARGV[4] - '1' to replace the due time even if later
-- returns the due time asked for, ms (Redis time is read only for a delay)
-- The sets have no TTL: every member is removed by whoever handles it (ack_outbox's
-- caller, the sweep), so they hold only what is in flight or live (docs/design.md).
local due
if ARGV[3] ~= '' then due = tonumber(ARGV[3]) else due = now_ms() + tonumber(ARGV[2]) end
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[1], due, ARGV[1])
else
  redis.call('ZADD', KEYS[1], 'LT', due, ARGV[1])
end
return due
