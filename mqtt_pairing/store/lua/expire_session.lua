-- expire_session: close a session that has been idle for the idle TTL (docs/protocol.md:
-- closed_reason "expired"), found through the expiry sets by the sweeper.
-- KEYS[1] - runner sessions hash ({runner:<id>})
-- KEYS[2] - runner outbox stream (same tag)
-- ARGV[1] - session_id
-- ARGV[2] - session idle TTL, ms
-- returns {'gone'} | {'alive', deadline_ms, app_id, now_ms}
--       | {'closed', session_json, the outbox entries this call
--         wrote (see outbox_closing)}
local json = redis.call('HGET', KEYS[1], ARGV[1])
if not json then return {'gone'} end
local s = cjson.decode(json)
local now = now_ms()
local deadline = tonumber(s['last_seen_at_ms']) + tonumber(ARGV[2])
if deadline > now then return {'alive', deadline, s['app_id'], now} end
redis.call('HDEL', KEYS[1], ARGV[1])
s['state'] = 'closed'
s['closed_reason'] = 'expired'
s['closed_at_ms'] = now
local closed = cjson.encode(s)
outbox_add(KEYS[2], 'session.closed', closed, '{}', now)
return {'closed', closed, outbox_closing(KEYS[2], {[ARGV[1]] = true})}
