-- claim_due: take up to N members whose due time has come, leasing each for `lease` ms
-- so that other instances skip them meanwhile; a dead instance's claims come due again
-- when the lease ends.
-- KEYS[1] - due sorted set ({global:<n>})
-- ARGV[1] - most members to take
-- ARGV[2] - lease, ms
-- returns the members taken
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), m)
end
return due
