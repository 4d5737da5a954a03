-- finish_request: remember (or forget) the reply of a request, record the outcome of a
-- guess (failure log, doubling penalty) and index a new session of the app.
-- All keys carry the identity's tag.
-- KEYS[1] - dedupe record of the request (dedupe_value in _prelude.lua)
-- KEYS[2] - limit hash of the identity (see limit_keep in _prelude.lua)
-- KEYS[3] - unused (any key of the tag)
-- KEYS[4] - session index hash of the app (session_id -> runner_id)
-- ARGV[1] - 'remember' | 'forget' (delete the pending mark) | 'none'
-- ARGV[2] - reply to remember (sealed by the caller when it holds a code)
-- ARGV[3] - dedupe TTL, ms (the mark's TTL was set by begin_request; this one applies only
--           if the mark expired meanwhile)
-- ARGV[4] - outcome: '' | 'failure' | 'success'
-- ARGV[5] - '1' when allowlisted (no automatic penalty)
-- ARGV[6] - failed guesses allowed in the window
-- ARGV[7] - failure window, ms
-- ARGV[8] - first penalty, ms
-- ARGV[9] - longest penalty, ms
-- ARGV[10] - penalty memory, ms (doubling resets after this long without a penalty)
-- ARGV[11] - Redis time of the request, ms (begin_request's now_ms; '' or 0: read it here)
-- ARGV[12] - session_id to index ('' none)
-- ARGV[13] - runner_id of that session
-- ARGV[14] - session_id to drop from the index ('' none)
-- ARGV[15] - session idle TTL, ms
-- ARGV[16] - '0' when begin_request saw no failure log (a success then clears nothing)
-- ARGV[17] - payload hash of the request ('' or absent: read from the record)
-- ARGV[18] - '1' when begin_request noted this request as a guess in flight ('pg'): it is
--            taken off (the entry of time ARGV[11]), whatever the outcome
-- returns {penalty_ms (0: none), strikes}
if ARGV[1] == 'remember' then
  dedupe_remember(KEYS[1], ARGV[17], ARGV[2], tonumber(ARGV[3]))
elseif ARGV[1] == 'forget' then
  redis.call('DEL', KEYS[1])
end
if ARGV[12] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[12], ARGV[13])
  if ARGV[14] ~= '' then redis.call('HDEL', KEYS[4], ARGV[14]) end
  redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[15]))
end
local outcome = ARGV[4]
local guessed = ARGV[18] == '1'
-- the pending guesses without this one's entry (begin's time, ARGV[11])
local function pending_without(pg)
  local out, mine, found = {}, tostring(ARGV[11]), false
  for t in string.gmatch(pg or '', '%d+') do
    if not found and t == mine then found = true else out[#out + 1] = t end
  end
  return table.concat(out, ' ')
end
if not (outcome == 'failure' and ARGV[5] ~= '1') then
  if guessed then
    local pg = redis.call('HGET', KEYS[2], 'pg')
    local rest = pending_without(pg)
    if outcome == 'success' and ARGV[16] ~= '0' then
      redis.call('HSET', KEYS[2], 'pg', rest, 'fl', '')
    elseif pg then
      redis.call('HSET', KEYS[2], 'pg', rest)
    end
  elseif outcome == 'success' and ARGV[16] ~= '0' then
    redis.call('HDEL', KEYS[2], 'fl')
  end
  return {0, 0}
end
-- a failed guess (not allowlisted): the failure log, perhaps a penalty
do
  local now = tonumber(ARGV[11])
  if not now or now <= 0 then now = now_ms() end
  local win = tonumber(ARGV[7])
  local g = redis.call('HMGET', KEYS[2], 'fl', 'strikes', 'last_penalty_end_ms', 'keep',
    'ban_until_ms', 'allow', 'pg')
  local pg = {}
  if guessed then pg = {'pg', pending_without(g[7])} end
  local log = log_since(g[1], now - win)
  log[#log + 1] = tostring(now)
  local persistent = limit_persistent(g[5], g[6])
  if #log >= tonumber(ARGV[6]) then
    local memory = tonumber(ARGV[10])
    local strikes = tonumber(g[2] or '0')
    if now - tonumber(g[3] or '0') > memory then strikes = 0 end
    strikes = strikes + 1
    local pen = tonumber(ARGV[8]) * (2 ^ math.min(strikes - 1, 40))
    pen = math.min(pen, tonumber(ARGV[9]))
    local keep = limit_keep(g[4], now + pen + memory, 0)
    redis.call('HSET', KEYS[2], 'strikes', strikes, 'penalty_until_ms', now + pen,
      'last_penalty_end_ms', now + pen, 'penalty_ms', pen, 'fl', '', 'keep', keep or g[4],
      (unpack or table.unpack)(pg))
    if keep and not persistent then redis.call('PEXPIREAT', KEYS[2], keep) end
    return {pen, strikes}
  end
  local keep = limit_keep(g[4], now + win, win)
  if keep then
    redis.call('HSET', KEYS[2], 'fl', table.concat(log, ' '), 'keep', keep,
      (unpack or table.unpack)(pg))
    if not persistent then redis.call('PEXPIREAT', KEYS[2], keep) end
  else
    redis.call('HSET', KEYS[2], 'fl', table.concat(log, ' '), (unpack or table.unpack)(pg))
  end
end
return {0, 0}
