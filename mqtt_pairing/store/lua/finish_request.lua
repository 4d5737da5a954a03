-- finish_request: remember (or forget) the reply of a request, record the outcome of a
-- guess (failure window, doubling penalty) and index a new session of the app.
-- All keys carry the identity's tag.
-- KEYS[1] - dedupe hash of the request
-- KEYS[2] - limit hash of the identity (strikes, last_penalty_end_ms, penalty_until_ms)
-- KEYS[3] - failed-guess sorted set of the identity
-- KEYS[4] - session index hash of the app (session_id -> runner_id)
-- ARGV[1] - 'remember' | 'forget' (delete the pending mark) | 'none'
-- ARGV[2] - reply to remember (sealed by the caller when it holds a code)
-- ARGV[3] - dedupe TTL, ms
-- ARGV[4] - outcome: '' | 'failure' | 'success'
-- ARGV[5] - '1' when allowlisted (no automatic penalty)
-- ARGV[6] - failed guesses allowed in the window
-- ARGV[7] - failure window, ms
-- ARGV[8] - first penalty, ms
-- ARGV[9] - longest penalty, ms
-- ARGV[10] - penalty memory, ms (doubling resets after this long without a penalty)
-- ARGV[11] - unique member for this failure
-- ARGV[12] - session_id to index ('' none)
-- ARGV[13] - runner_id of that session
-- ARGV[14] - session_id to drop from the index ('' none)
-- ARGV[15] - session idle TTL, ms
-- returns {penalty_ms (0: none), strikes}
-- (Redis time is read only for a failure: a success or an index needs none)
if ARGV[1] == 'remember' then
  redis.call('HSET', KEYS[1], 'st', 'done', 'reply', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
elseif ARGV[1] == 'forget' then
  redis.call('DEL', KEYS[1])
end
if ARGV[12] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[12], ARGV[13])
  if ARGV[14] ~= '' then redis.call('HDEL', KEYS[4], ARGV[14]) end
  redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[15]))
end
local outcome = ARGV[4]
if outcome == 'success' then
  redis.call('DEL', KEYS[3])
elseif outcome == 'failure' and ARGV[5] ~= '1' then
  local now = now_ms()
  local win = tonumber(ARGV[7])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - win)
  redis.call('ZADD', KEYS[3], now, ARGV[11])
  redis.call('PEXPIRE', KEYS[3], win)
  if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[6]) then
    local memory = tonumber(ARGV[10])
    local lim = redis.call('HMGET', KEYS[2], 'strikes', 'last_penalty_end_ms')
    local strikes = tonumber(lim[1] or '0')
    if now - tonumber(lim[2] or '0') > memory then strikes = 0 end
    strikes = strikes + 1
    local pen = tonumber(ARGV[8]) * (2 ^ math.min(strikes - 1, 40))
    pen = math.min(pen, tonumber(ARGV[9]))
    redis.call('HSET', KEYS[2], 'strikes', strikes, 'penalty_until_ms', now + pen,
      'last_penalty_end_ms', now + pen, 'penalty_ms', pen)
    redis.call('PEXPIRE', KEYS[2], pen + memory)
    redis.call('DEL', KEYS[3])
    return {pen, strikes}
  end
end
return {0, 0}
