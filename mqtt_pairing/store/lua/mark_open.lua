-- mark_open: the marks a pair writes with the open, in one index shard ({global:<n>} of the
-- runner, so both sets share a slot): the runner's outbox is due after the lease (an
-- earlier due time is kept), and the session's idle deadline.
-- KEYS[1] - outbox-due sorted set of the runner's shard
-- KEYS[2] - expiry sorted set of the same shard
-- ARGV[1] - runner_id
-- ARGV[2] - lease, ms
-- ARGV[3] - expiry member: runner_id .. '\n' .. session_id
-- ARGV[4] - session idle TTL, ms
-- returns the due time of the outbox, ms
-- The deadline is now + idle TTL + lease: this runs before the open in its batch, and the
-- open (last_seen_at) follows within the lease, so the deadline is never before
-- last_seen_at + idle TTL; expire_session checks last_seen_at anyway.
local now = now_ms()
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'LT', now + lease, ARGV[1])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]) + lease, ARGV[3])
return now + lease
