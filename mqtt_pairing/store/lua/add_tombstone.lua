-- add_tombstone: remember a code after its expiry (mqtt_pairing/tombstones.py): append
-- its 8-byte record to the string of its shard and expiry window.
-- KEYS[1] - tombstone string ({c:<group>}, window)
-- ARGV[1] - fingerprint: 12 hex characters of the digest
-- ARGV[2] - expiry within the window, in 1/65536 steps (0..65535)
-- ARGV[3] - when the string may go, ms since the epoch (after its window's last record
--           stops mattering)
-- returns the string's length, bytes
local off = tonumber(ARGV[2])
local len = redis.call('APPEND', KEYS[1],
  unhex(ARGV[1]) .. string.char(math.floor(off / 256), off % 256))
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return len
