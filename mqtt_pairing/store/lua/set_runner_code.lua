-- set_runner_code: make a code the runner's active one (replacing any earlier code), keep
-- its name, public key and metadata, and remember the sealed reply.
-- KEYS[1] - runner hash ({runner:<id>})
-- KEYS[2] - dedupe record of the request (dedupe_value in _prelude.lua)
-- ARGV[1] - digest of the new code
-- ARGV[2] - its expiry, ms since the epoch
-- ARGV[3] - TTL of the runner hash, ms (outlives the code and the idle TTL by a margin)
-- ARGV[4] - sealed reply
-- ARGV[5] - dedupe TTL, ms
-- ARGV[6] - runner name ('' none)
-- ARGV[7] - public key ('' none)
-- ARGV[8] - metadata as JSON ('' none)
-- ARGV[9] - uses of the new code (code_max; code_opened counts the sessions opened with
--           it, see open_session.lua and clear_runner_code.lua); absent: not counted (a
--           cancel then asks the code's slot)
-- returns the digest of the replaced code, or ''
local old = redis.call('HGET', KEYS[1], 'code') or ''
if old ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'code', ARGV[1], 'code_expires_ms', ARGV[2])
  if ARGV[9] then
    redis.call('HSET', KEYS[1], 'code_max', ARGV[9], 'code_opened', 0)
  else
    redis.call('HDEL', KEYS[1], 'code_max', 'code_opened')
  end
end
local fields = {'name', 'public_key', 'metadata'}
for i, f in ipairs(fields) do
  if ARGV[5 + i] ~= '' then
    redis.call('HSET', KEYS[1], f, ARGV[5 + i])
  else
    redis.call('HDEL', KEYS[1], f)
  end
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
dedupe_remember(KEYS[2], nil, ARGV[4], tonumber(ARGV[5]))
if old == ARGV[1] then return '' end
return old
