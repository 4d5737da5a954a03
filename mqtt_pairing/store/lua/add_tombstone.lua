-- add_tombstone: remember a code after its expiry (mqtt_pairing/tombstones.py): add its
-- 6-byte record to the string of its group, expiry window and bucket.
-- KEYS[1] - tombstone string ({c:<group>}, window, bucket)
-- ARGV[1] - fingerprint: 10 hex characters of the digest
-- ARGV[2] - expiry within the window, in 1/256 steps (0..255)
-- ARGV[3] - when the string may go, ms since the epoch (after its window's last record
--           stops mattering)
-- The string is rewritten whole (SET at its exact size), not APPENDed to: APPEND
-- preallocates up to as much again as the string holds.
-- returns the string's length, bytes
local s = redis.call('GET', KEYS[1]) or ''
s = s .. unhex(ARGV[1]) .. string.char(tonumber(ARGV[2]))
redis.call('SET', KEYS[1], s, 'PXAT', ARGV[3])
return #s
