-- find_tombstone: did a code with this fingerprint expire within the tombstone time?
-- (mqtt_pairing/tombstones.py: 8-byte records, 6 of fingerprint, 2 of expiry within
-- the window in 1/65536 steps)
-- KEYS[i] - tombstone strings of one shard ({global:<shard>}), window ARGV[3 + i]
-- ARGV[1] - fingerprint: 12 hex characters of the digest
-- ARGV[2] - window, ms
-- ARGV[3] - tombstone, ms
-- ARGV[3 + i] - the window of KEYS[i]
-- returns 1 if a record's expiry e has e <= now < e + tombstone (Redis time), else 0
local fp = unhex(ARGV[1])
local w = tonumber(ARGV[2])
local tomb = tonumber(ARGV[3])
local now = now_ms()
for i, key in ipairs(KEYS) do
  local s = redis.call('GET', key)
  if s then
    local base = tonumber(ARGV[3 + i]) * w
    local from = 1
    while true do
      local p = string.find(s, fp, from, true)
      if not p then break end
      if (p - 1) % 8 == 0 then
        local off = string.byte(s, p + 6) * 256 + string.byte(s, p + 7)
        local e = base + math.floor(off * w / 65536)
        if e <= now and now < e + tomb then return 1 end
        from = p + 8
      else
        from = p + 1
      end
    end
  end
end
return 0
