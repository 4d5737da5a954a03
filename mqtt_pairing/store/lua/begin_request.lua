-- begin_request: replay check, admin ban, penalty and request rate of one identity, and
-- the pending mark of the request (docs/protocol.md "Idempotency", "App pair" checks 1-3).
-- All keys carry the identity's tag ({app:<id>} or {runner:<id>}).
-- KEYS[1] - dedupe record of (kind, id, op, request_id) (dedupe_value in _prelude.lua)
-- KEYS[2] - limit hash of the identity: ban, allowlist, penalty, request and failure logs
--           (see limit_keep in _prelude.lua), read with one HMGET
-- ARGV[1] - payload hash (hex)
-- ARGV[2] - pending lease, ms (a copy arriving later waits this long before taking over)
-- ARGV[3] - dedupe TTL, ms (0: the op has no idempotency); set once, when the mark is made
--           (one SET NX GET reads the record and makes the mark)
-- ARGV[4] - '1' to check the admin ban
-- ARGV[5] - '1' to check the automatic penalty
-- ARGV[6] - request limit in the window (0: none)
-- ARGV[7] - request window, ms
-- ARGV[8] - failed guesses allowed in the failure window (0: not a guess): with the
--           guesses in flight ('pg', begin times, forgotten after the pending lease or the
--           failure window, whichever is shorter) they may not exceed it, so that
--           concurrent guesses cannot overshoot the limit; a guess taken is added to 'pg'
--           and taken off by finish_request
-- ARGV[9] - failure window, ms
-- returns {'replay', reply} | {'pending'} | {'mismatch'} | {'banned', retry_ms (-1: permanent)}
--       | {'limited', retry_ms}
--       | {'ok', allowlisted (0/1), now_ms, takeover (0/1), failures (0/1: the failure log
--          may hold a guess, for finish_request), payload hash (for finish_request),
--          guessing (0/1: a guess in flight was noted, for finish_request to take off)}
local now = now_ms()
local dedupe_ttl = tonumber(ARGV[3])
local takeover, marked = 0, false
local mark = ''
if dedupe_ttl > 0 then
  mark = dedupe_value('p', ARGV[1], now + tonumber(ARGV[2]), '')
  local old = redis.pcall('SET', KEYS[1], mark, 'NX', 'PX', dedupe_ttl, 'GET')
  if type(old) == 'table' and old.err then
    -- A record of an earlier version (a hash with h, st, lease, reply), within its TTL
    -- after an upgrade: read as it was, then replaced by a record of this version.
    local d = redis.call('HMGET', KEYS[1], 'h', 'st', 'lease', 'reply')
    local left = redis.call('PTTL', KEYS[1])
    redis.call('DEL', KEYS[1])
    if not d[1] then
      old = false
    else
      local st = d[2] == 'done' and 'd' or 'p'
      old = dedupe_value(st, d[1], st == 'd' and '' or (d[3] or '0'), d[4] or '')
      redis.call('SET', KEYS[1], old, 'PX', left > 0 and left or dedupe_ttl)
    end
    if not old then redis.call('SET', KEYS[1], mark, 'PX', dedupe_ttl) end
  end
  if old then
    local st, h, lease, reply = dedupe_parse(old)
    if h ~= ARGV[1] then return {'mismatch'} end
    if st == 'd' then return {'replay', reply} end
    if (lease or 0) > now then return {'pending'} end
    takeover = 1
  else
    marked = true
  end
end
-- A refusal below takes back the mark this call made.
local function refuse(reply)
  if marked then redis.call('DEL', KEYS[1]) end
  return reply
end
local g = redis.call('HMGET', KEYS[2], 'ban_until_ms', 'allow', 'penalty_until_ms', 'rq', 'fl',
  'keep', 'pg')
local fields, need, slack = {}, 0, 0
local guessing = 0
if ARGV[4] == '1' and g[1] then
  local u = tonumber(g[1])
  if u < 0 then return refuse({'banned', -1}) end
  if u > now then return refuse({'banned', u - now}) end
end
if takeover == 0 then
  if ARGV[5] == '1' then
    local pu = tonumber(g[3] or '0')
    if pu > now then return refuse({'limited', pu - now}) end
  end
  local lim = tonumber(ARGV[6])
  if lim > 0 then
    local win = tonumber(ARGV[7])
    local log = log_since(g[4], now - win)
    if #log >= lim then
      return refuse({'limited', tonumber(log[#log - lim + 1]) + win - now})
    end
    log[#log + 1] = tostring(now)
    fields[#fields + 1], fields[#fields + 2] = 'rq', table.concat(log, ' ')
    need, slack = now + win, win
  end
  local glim = tonumber(ARGV[8] or '0')
  if glim > 0 and g[2] ~= '1' then
    local fwin = tonumber(ARGV[9])
    local fails = log_since(g[5], now - fwin)
    -- a guess counts in flight for the pending lease at most (its request is then
    -- taken over or given up), and no longer than a failure would count
    local lease = math.min(tonumber(ARGV[2]), fwin)
    local pend = log_since(g[7], now - lease)
    if #fails + #pend >= glim then
      -- as many guesses in flight as may still fail: wait for one to end (slow down)
      return refuse({'limited', 1000})
    end
    pend[#pend + 1] = tostring(now)
    fields[#fields + 1], fields[#fields + 2] = 'pg', table.concat(pend, ' ')
    if now + lease > need then need = now + lease end
    guessing = 1
  end
end
if #fields > 0 then
  local keep = limit_keep(g[6], need, slack)
  if keep then
    fields[#fields + 1], fields[#fields + 2] = 'keep', keep
    redis.call('HSET', KEYS[2], (unpack or table.unpack)(fields))
    if not limit_persistent(g[1], g[2]) then redis.call('PEXPIREAT', KEYS[2], keep) end
  else
    redis.call('HSET', KEYS[2], (unpack or table.unpack)(fields))
  end
end
-- the mark of a copy that died: same payload, still pending, TTL set when it was made
if takeover == 1 then redis.call('SET', KEYS[1], mark, 'XX', 'KEEPTTL') end
return {'ok', g[2] == '1' and 1 or 0, now, takeover, g[5] and 1 or 0, ARGV[1], guessing}
