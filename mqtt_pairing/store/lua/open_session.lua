-- open_session: open the session of a claimed use, in the runner's slot (docs/design.md step 3):
-- only if the code is still the runner's active code, the runner is not known to be
-- offline and its session limit allows. An earlier session of the same app is replaced
-- (and does not count toward the limit). Opening the same session_id again returns it.
-- KEYS[1] - runner hash ({runner:<id>})
-- KEYS[2] - runner sessions hash (session_id -> session JSON)
-- KEYS[3] - runner outbox stream (same tag)
-- KEYS[4] - runner history stream (same tag)
-- ARGV[1] - code digest
-- ARGV[2] - session_id
-- ARGV[3] - runner_id
-- ARGV[4] - app_id
-- ARGV[5] - app name ('' none)
-- ARGV[6] - TTL of the runner's sessions hash, ms (idle TTL plus a margin: it must outlive
--           the idle deadline, at which the expiry sweep reads it). The runner hash is not
--           refreshed here: set_runner_code gave it idle TTL plus a margin when the code was
--           issued (heartbeats and statuses refresh it), and nothing reads it at a
--           session's deadline.
-- ARGV[7] - most active sessions per runner
-- ARGV[8] - JSON {app_public_key, app_metadata, uses_left, code_mask} of the outbox entry:
--           one session.opened entry that the relay renders as the session.opened events
--           and code.used (uses_left: what is left of the code after this use); code_mask
--           for the history records its deliverer writes after a crash
-- ARGV[9] - the code, masked, for the history record
-- ARGV[10] - most records kept in the runner's history stream (approximate)
-- ARGV[11] - history retention, ms (the stream expires when idle this long; records older
--            are trimmed on about one open in 16, and never shown: admin.py)
-- ARGV[12] - now, ms: a Redis time read earlier in the same request ('' or absent: TIME)
-- returns {'ok', session_json, replaced_json or '', runner_name, public_key, metadata_json,
--          repeat (0/1), the outbox entries this call wrote (with a replaced session:
--          see outbox_closing)} (absent values as '')
--       | {'code_gone'} | {'offline'} | {'limit'}
-- Writes session.opened (with code.used) and (for a replaced session) session.closed to
-- the outbox, and pair.succeeded to the runner's history (once: with the open itself); a
-- repeat writes nothing new and returns no entries (what the first attempt
-- wrote is published by it, or by the sweep if it died: sessions.py).
local r = redis.call('HMGET', KEYS[1], 'code', 'name', 'public_key', 'metadata',
  'status', 'status_ms', 'hb_ms')
local name, pk, md = r[2] or '', r[3] or '', r[4] or ''
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  if all[i] == ARGV[2] then return {'ok', all[i + 1], '', name, pk, md, 1, {}} end
end
if r[1] ~= ARGV[1] then return {'code_gone'} end
if r[5] == 'offline' and tonumber(r[6] or '0') >= tonumber(r[7] or '0') then
  return {'offline'}
end
local now
if ARGV[12] and ARGV[12] ~= '' then now = tonumber(ARGV[12]) else now = now_ms() end
local count, replaced_id, replaced = 0, nil, nil
for i = 1, #all, 2 do
  local s = cjson.decode(all[i + 1])
  if s['app_id'] == ARGV[4] then
    replaced_id, replaced = all[i], s
  else
    count = count + 1
  end
end
if count >= tonumber(ARGV[7]) then return {'limit'} end
local s = {session_id = ARGV[2], runner_id = ARGV[3], app_id = ARGV[4],
  created_at_ms = now, last_seen_at_ms = now}
if name ~= '' then s['runner_name'] = name end
if ARGV[5] ~= '' then s['app_name'] = ARGV[5] end
local json = cjson.encode(s)
redis.call('HSET', KEYS[2], ARGV[2], json)
-- A use of the code is spent now (clear_runner_code tells a cancel whether any was left).
redis.call('HINCRBY', KEYS[1], 'code_opened', 1)
outbox_add(KEYS[3], 'session.opened', json, ARGV[8], now)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[10], '*', 'event', 'pair.succeeded',
  'runner_id', ARGV[3], 'app_id', ARGV[4], 'session_id', ARGV[2], 'code_mask', ARGV[9])
local retention = tonumber(ARGV[11])
redis.call('PEXPIRE', KEYS[4], retention)
if now % 16 == 0 then redis.call('XTRIM', KEYS[4], 'MINID', tostring(now - retention)) end
local replaced_json = ''
if replaced_id then
  redis.call('HDEL', KEYS[2], replaced_id)
  replaced['state'] = 'closed'
  replaced['closed_reason'] = 'replaced'
  replaced['closed_at_ms'] = now
  replaced_json = cjson.encode(replaced)
  outbox_add(KEYS[3], 'session.closed', replaced_json, '{}', now)
end
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[6]))
local written = outbox_written
if replaced_id then written = outbox_closing(KEYS[3], {[replaced_id] = true}) end
return {'ok', json, replaced_json, name, pk, md, 0, written}
