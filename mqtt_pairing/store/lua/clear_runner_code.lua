-- clear_runner_code: the runner no longer has an active code (cancel-code, runner ban).
-- KEYS[1] - runner hash ({runner:<id>})
-- returns the digest of the code that was active, or ''
local old = redis.call('HGET', KEYS[1], 'code') or ''
redis.call('HDEL', KEYS[1], 'code', 'code_expires_ms')
return old
