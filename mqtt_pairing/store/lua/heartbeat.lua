-- heartbeat: a runner's heartbeat; refreshes its presence and the last_seen_at of its
-- sessions (docs/protocol.md "Session object"), without a dedupe key, and announces a change
-- from offline to online to its paired apps.
-- KEYS[1] - runner hash ({runner:<id>})
-- KEYS[2] - runner sessions hash (same tag)
-- KEYS[3] - runner outbox stream (same tag)
-- ARGV[1] - TTL of the runner's keys, ms (idle TTL plus a margin, see open_session.lua)
-- ARGV[2] - how long a heartbeat makes a runner online, ms
-- ARGV[3] - presence changes announced at most per window (see announce)
-- ARGV[4] - that window, ms (a change held back is announced by a later heartbeat)
-- ARGV[5] - renew the keys' TTLs when last renewed by a heartbeat this long ago, ms (less
--           than the margin of ARGV[1], so that the keys still outlive their sessions' idle
--           deadline by the rest of it; absent: every time). The runner hash's 'ttl_ms' is
--           when a heartbeat last renewed them.
-- returns {sessions refreshed, the outbox entries this call wrote (none if nothing was
--          announced)}
-- Costs TIME, HMGET, HSET, HGETALL and, with sessions, one HSET; the PEXPIREs once per ARGV[5].
local now = now_ms()
local r = redis.call('HMGET', KEYS[1], 'status', 'status_ms', 'ttl_ms', 'announced', 'ann_from',
  'ann_n')
-- Processed after a status recorded in the same millisecond: the heartbeat is the later
-- sign (presence_of lets an offline status win a tie).
local hb = now
if r[2] and tonumber(r[2]) >= hb then hb = tonumber(r[2]) + 1 end
local renew = not r[3] or now - tonumber(r[3]) >= tonumber(ARGV[5] or '0')
local ttl = tonumber(ARGV[1])
if renew then
  redis.call('HSET', KEYS[1], 'hb_ms', hb, 'ttl_ms', now)
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('HSET', KEYS[1], 'hb_ms', hb)
end
local all = redis.call('HGETALL', KEYS[2])
if #all > 0 then
  local set = {}
  for i = 1, #all, 2 do
    local s = cjson.decode(all[i + 1])
    s['last_seen_at_ms'] = now
    set[#set + 1] = all[i]
    set[#set + 1] = cjson.encode(s)
  end
  redis.call('HSET', KEYS[2], (unpack or table.unpack)(set))
  if renew then redis.call('PEXPIRE', KEYS[2], ttl) end
end
announce(KEYS[1], KEYS[2], KEYS[3], presence_of(r[1], r[2], hb, now, tonumber(ARGV[2])), now,
  tonumber(ARGV[3]), tonumber(ARGV[4]), {r[4], r[5], r[6]})
return {math.floor(#all / 2), outbox_written}
