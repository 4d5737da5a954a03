-- open_session: open the session of a claimed use, in the runner's slot (docs/design.md step 3):
-- only if the code is still the runner's active code, the runner is not known to be
-- offline and its session limit allows. An earlier session of the same app is replaced
-- (and does not count toward the limit). Opening the same session_id again returns it.
-- KEYS[1] - runner hash ({runner:<id>})
-- KEYS[2] - runner sessions hash (session_id -> session JSON)
-- KEYS[3] - runner outbox stream (same tag)
-- ARGV[1] - code digest
-- ARGV[2] - session_id
-- ARGV[3] - runner_id
-- ARGV[4] - app_id
-- ARGV[5] - app name ('' none)
-- ARGV[6] - TTL of the runner's keys, ms (idle TTL plus a margin: they must outlive the
--           idle deadline, at which the expiry sweep reads them)
-- ARGV[7] - most active sessions per runner
-- ARGV[8] - JSON {app_public_key, app_metadata} for the session.opened event
-- ARGV[9] - uses left on the code after this use (for the code.used event)
-- returns {'ok', session_json, replaced_json or '', runner_name, public_key, metadata_json,
--          repeat (0/1), the outbox entries this call wrote (with a replaced session:
--          see outbox_closing)} (absent values as '')
--       | {'code_gone'} | {'offline'} | {'limit'}
-- Writes session.opened, code.used and (for a replaced session) session.closed to the
-- outbox; a repeat writes nothing new and returns no entries (what the first attempt
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
local now = now_ms()
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
outbox_add(KEYS[3], 'code.used', json, cjson.encode({uses_left = tonumber(ARGV[9])}), now)
local replaced_json = ''
if replaced_id then
  redis.call('HDEL', KEYS[2], replaced_id)
  replaced['state'] = 'closed'
  replaced['closed_reason'] = 'replaced'
  replaced['closed_at_ms'] = now
  replaced_json = cjson.encode(replaced)
  outbox_add(KEYS[3], 'session.closed', replaced_json, '{}', now)
end
local ttl = tonumber(ARGV[6])
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[1], ttl)
local written = outbox_written
if replaced_id then written = outbox_closing(KEYS[3], {[replaced_id] = true}) end
return {'ok', json, replaced_json, name, pk, md, 0, written}
