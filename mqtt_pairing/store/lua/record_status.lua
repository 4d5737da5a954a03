-- record_status: a runner's retained status message (or its Last Will). Every instance
-- sees every status message (no $share, so retained ones are replayed); this script
-- decides whether presence changed, so apps hear of a change once (docs/protocol.md).
-- KEYS[1] - runner hash ({runner:<id>})
-- KEYS[2] - runner sessions hash (same tag)
-- KEYS[3] - runner outbox stream (same tag)
-- ARGV[1] - state: 'online' | 'offline' | '' (nothing recorded: announce the recorded
--           presence if a held-back change is now allowed, see announce)
-- ARGV[2] - '1' if the broker replayed it as retained (on subscribe)
-- ARGV[3] - how long a heartbeat makes a runner online, ms
-- ARGV[4] - TTL of the runner's keys, ms (idle TTL plus a margin, see open_session.lua)
-- ARGV[5] - presence changes announced at most per window
-- ARGV[6] - that window, ms
-- returns {changed (0/1), the outbox entries this call wrote, ms until a held-back
--          change may be announced (0: none held back)}
local now = now_ms()
local r = redis.call('HMGET', KEYS[1], 'status', 'status_ms', 'hb_ms', 'announced', 'ann_from',
  'ann_n')
local ann = {r[4], r[5], r[6]}
local max, window = tonumber(ARGV[5]), tonumber(ARGV[6])
-- A replayed retained status that matches what is recorded changes nothing (and must
-- not make an old status newer than a later heartbeat); nor does no status. Either
-- announces the recorded presence if a change was held back.
if ARGV[1] == '' or (ARGV[2] == '1' and r[1] == ARGV[1]) then
  if not r[1] and not r[3] then return {0, {}, 0} end
  local held = announce(KEYS[1], KEYS[2], KEYS[3],
    presence_of(r[1], r[2], r[3], now, tonumber(ARGV[3])), now, max, window, ann)
  return {#outbox_written > 0 and 1 or 0, outbox_written, held}
end
-- Processed after a heartbeat recorded in the same millisecond: the status is the later
-- sign (heartbeat.lua does the same the other way round).
local st = now
if r[3] and tonumber(r[3]) >= st then st = tonumber(r[3]) + 1 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'status_ms', st)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
local held = announce(KEYS[1], KEYS[2], KEYS[3],
  presence_of(ARGV[1], st, r[3], now, tonumber(ARGV[3])), now, max, window, ann)
if #outbox_written == 0 then return {0, {}, held} end
return {1, outbox_written, held}
