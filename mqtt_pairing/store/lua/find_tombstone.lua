-- find_tombstone: did a code with this fingerprint expire within the tombstone time?
-- (claim_code.lua asks the same when the code's hash is gone; this one is for the admin
-- and the tests.)
-- KEYS[i] - tombstone strings of one code group ({c:<group>}), window ARGV[3 + i]
-- ARGV[1] - fingerprint: 10 hex characters of the digest
-- ARGV[2] - window, ms
-- ARGV[3] - tombstone, ms
-- ARGV[3 + i] - the window of KEYS[i]
-- returns 1 if a record's expiry e has e <= now < e + tombstone (Redis time), else 0
if tombstone_expired(1, 1, now_ms()) then return 1 end
return 0
