-- Prepended to every script. Time always comes from Redis (docs/design.md), in milliseconds.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The outbox of a runner's slot (docs/design.md "Delivery"): events written by the script that
-- changes state; entries are t (event type), s (session JSON, internal form), x (extra
-- JSON) and at (ms). The script returns the entries it wrote itself (outbox_written, in
-- XRANGE's shape), and the instance that ran it publishes and deletes (ack_outbox)
-- exactly those: what other scripts wrote is theirs to publish, or the sweep's if their
-- instance died (each event is published once when nothing fails).
local outbox_written = {}
local function outbox_add(key, kind, session_json, extra_json, at)
  local id = redis.call('XADD', key, '*', 't', kind, 's', session_json, 'x', extra_json, 'at', at)
  outbox_written[#outbox_written + 1] =
    {id, {'t', kind, 's', session_json, 'x', extra_json, 'at', tostring(at)}}
end

-- What a script that closes sessions returns: the session.opened entries of those
-- sessions that another request wrote and has not published yet (a close overtaking a
-- slow open), then its own. No party hears of a close before the open; the open may go
-- out twice then (same event_id: clients drop the copy). `closing`: session_id -> true.
-- Costs one XLEN when the outbox holds only this script's entries.
local function outbox_closing(key, closing)
  if redis.call('XLEN', key) <= #outbox_written then return outbox_written end
  local mine, out = {}, {}
  for _, e in ipairs(outbox_written) do mine[e[1]] = true end
  for _, e in ipairs(redis.call('XRANGE', key, '-', '+', 'COUNT', 200)) do
    local f = e[2]
    if not mine[e[1]] and f[2] == 'session.opened' and f[3] == 's' and f[4] ~= '' then
      if closing[cjson.decode(f[4])['session_id']] then out[#out + 1] = e end
    end
  end
  for _, e in ipairs(outbox_written) do out[#out + 1] = e end
  return out
end

-- Presence by docs/protocol.md "Presence": 'offline' | 'online' | 'unknown'.
local function presence_of(status, status_ms, hb_ms, now, hb_window_ms)
  status_ms = tonumber(status_ms or '0')
  hb_ms = tonumber(hb_ms or '0')
  if status == 'offline' and status_ms >= hb_ms then return 'offline' end
  if status == 'online' then return 'online' end
  if hb_ms > 0 and now - hb_ms < hb_window_ms then return 'online' end
  return 'unknown'
end

-- Tell the runner's paired apps about a change between online and offline, once: the
-- last announced state is kept in the runner hash; changes to or from unknown say
-- nothing, and the first known state is only recorded. At most `max` changes are
-- announced per window of `window` ms per runner (docs/protocol.md "Events"): past
-- them a change is held back (nothing announced, 'announced' unchanged) and the delay
-- in ms until the window allows one is returned, for the caller to announce the
-- presence of then (record_status with no state); else 0.
local function announce(runner_key, sessions_key, outbox_key, presence, now, max, window, h)
  if presence == 'unknown' then return 0 end
  -- h: the runner hash's 'announced', 'ann_from', 'ann_n', when the caller read them already
  h = h or redis.call('HMGET', runner_key, 'announced', 'ann_from', 'ann_n')
  local last = h[1]
  if last == presence then return 0 end
  if not last then
    redis.call('HSET', runner_key, 'announced', presence)
    return 0
  end
  local from, n = tonumber(h[2]), tonumber(h[3]) or 0
  if not from or now >= from + window then from, n = now, 0 end
  if n >= max then return from + window - now end
  redis.call('HSET', runner_key, 'announced', presence, 'ann_from', from, 'ann_n', n + 1)
  local pv = redis.call('HINCRBY', runner_key, 'pv', 1)
  local targets = {}
  for _, json in ipairs(redis.call('HVALS', sessions_key)) do
    local s = cjson.decode(json)
    targets[#targets + 1] = {s['session_id'], s['app_id']}
  end
  if #targets == 0 then return 0 end
  outbox_add(outbox_key, 'runner.' .. presence, '',
    cjson.encode({pv = pv, sessions = targets}), now)
  return 0
end

-- Hex text to bytes ('3f9a' -> '\63\154').
local function unhex(h)
  return (string.gsub(h, '..', function(c) return string.char(tonumber(c, 16)) end))
end

-- Did a code expire within the tombstone time? (mqtt_pairing/tombstones.py: 6-byte
-- records, 5 of fingerprint, 1 of expiry within the window in 1/256 steps.)
-- KEYS[first], KEYS[first + 1], ... are the strings of the code's group; ARGV[a] is the
-- fingerprint (10 hex), ARGV[a + 1] the window (ms), ARGV[a + 2] the tombstone (ms),
-- ARGV[a + 3], ... the window of each of those keys, in order.
-- Returns true if a record's expiry e has e <= now < e + tombstone. Reads the strings
-- with one MGET.
local function tombstone_expired(first, a, now)
  local fp = unhex(ARGV[a])
  local w = tonumber(ARGV[a + 1])
  local tomb = tonumber(ARGV[a + 2])
  -- Only windows that can hold an expiry e with now - tomb < e <= now are read: the
  -- window of live codes' records (e > now) and those past their time are skipped.
  local keys, bases = {}, {}
  for i = first, #KEYS do
    local base = tonumber(ARGV[a + 3 + i - first]) * w
    if base <= now and base + w + tomb > now then
      keys[#keys + 1] = KEYS[i]
      bases[#bases + 1] = base
    end
  end
  if #keys == 0 then return false end
  local got = redis.call('MGET', (unpack or table.unpack)(keys))
  for j = 1, #keys do
    local s, base = got[j], bases[j]
    if s then
      local from = 1
      while true do
        local p = string.find(s, fp, from, true)
        if not p then break end
        if (p - 1) % 6 == 0 then
          local e = base + math.floor(string.byte(s, p + 5) * w / 256)
          if e <= now and now < e + tomb then return true end
          from = p + 6
        else
          from = p + 1
        end
      end
    end
  end
  return false
end

-- The limit hash of an identity (limit:{<kind>:<id>}, docs/design.md "Redis keys") holds
-- its admin ban (ban_reason, ban_by, ban_at_ms, ban_until_ms: -1 permanent), the allowlist
-- (allow = '1'), its automatic penalty (strikes, penalty_until_ms, last_penalty_end_ms,
-- penalty_ms), and the logs of its counted requests (rq) and failed guesses (fl): times in
-- ms, separated by spaces, oldest first. It lives as long as what it holds: 'keep' is the
-- latest time (ms) that anything in it must last until; the hash expires then, and has no
-- TTL while it holds a permanent ban or the allowlist (limit_ttl).

-- The times of a log (rq, fl) later than `after`, as a list of strings.
local function log_since(s, after)
  local out = {}
  for t in string.gmatch(s or '', '%d+') do
    if tonumber(t) > after then out[#out + 1] = t end
  end
  return out
end

-- Whether the limit hash must keep no TTL, from its ban_until_ms and allow.
local function limit_persistent(ban_until, allow)
  return ban_until == '-1' or allow == '1'
end

-- What 'keep' becomes when something in the hash must last until `need` (ms): nil if it
-- does already, else need + slack (so that a busy identity renews it once per slack).
local function limit_keep(keep, need, slack)
  if tonumber(keep or '0') >= need then return nil end
  return need + slack
end

-- Give the limit hash the TTL that its fields ask for (after a write that changed them).
local function limit_ttl(key, keep, persistent)
  if persistent then
    redis.call('PERSIST', key)
  elseif keep then
    redis.call('PEXPIREAT', key, keep)
  else
    redis.call('DEL', key)
  end
end

-- The dedupe record of a request (docs/design.md "Redis keys"), a string:
-- state ('p' pending, 'd' done), payload hash, lease (ms, while pending) and the
-- remembered reply, separated by newlines (the reply, last, may hold any byte).
local function dedupe_value(st, h, lease, reply)
  return st .. '\n' .. h .. '\n' .. lease .. '\n' .. reply
end

-- st, h, lease (a number, or nil), reply of a dedupe record.
local function dedupe_parse(v)
  local st, h, lease, reply = string.match(v, '^(%a)\n([^\n]*)\n(%d*)\n(.*)$')
  return st, h, tonumber(lease), reply
end

-- Remember the reply of a request under its record (KEEPTTL: the TTL was set when the
-- pending mark was made); `h` is the payload hash, nil: the record's own. A record gone
-- meanwhile (the request outlived the dedupe TTL) is written anew with `ttl_ms`.
local function dedupe_remember(key, h, reply, ttl_ms)
  if not h or h == '' then
    local v = redis.call('GET', key)
    h = v and select(2, dedupe_parse(v)) or ''
  end
  local value = dedupe_value('d', h, '', reply)
  if not redis.call('SET', key, value, 'XX', 'KEEPTTL') then
    redis.call('SET', key, value, 'PX', ttl_ms)
  end
end
