-- issue_code: create a new code under its digest, unless the digest is taken.
-- KEYS[1] - code hash ({c:<group>}, store/keys.py)
-- ARGV[1] - runner_id
-- ARGV[2] - max uses
-- ARGV[3] - TTL, ms
-- ARGV[4] - first character of the code (for the masked form; the fingerprint is the
--           digest's own, so it is not stored)
-- The hash lives until the code expires; after that its tombstone record
-- (add_tombstone.lua) tells CODE_EXPIRED from CODE_NOT_FOUND.
-- The record's fields have one-letter names (memory: the names are stored in every hash):
-- r runner_id, s state (active | used | replaced | cancelled), m max_uses, u uses_left,
-- c created ms, e expires ms, f first character of the code; z (end_code) the state a
-- used-up code was replaced or cancelled to, taken when a use is given back.
-- returns {0} (collision: draw another code) | {1, created_ms, expires_ms}
if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
local now = now_ms()
local expires = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'r', ARGV[1], 's', 'active', 'm', ARGV[2], 'u', ARGV[2],
  'c', now, 'e', expires, 'f', ARGV[4])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return {1, now, expires}
