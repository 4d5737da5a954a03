-- append_history: add audit records to a history stream, trimmed by count and age.
-- KEYS[1] - history stream ({global:<n>}, {runner:<id>} or {app:<id>})
-- ARGV[1] - most entries kept (approximate trim)
-- ARGV[2] - retention, ms (older entries are trimmed)
-- ARGV[3] - '1' to let the stream expire when idle for the retention (per-identity streams)
-- ARGV[4..] - the records, in order, each as: once, n, then n items (field, value, ...).
--   once = '1' skips the record when one of the stream's last 16 entries has the same
--   'event' and 'session_id' (a session's events can be recorded by two writers: the pair
--   itself and whichever delivery deleted the outbox entry; the first wins)
-- returns the number of records added
local now = now_ms()
local unpack_ = unpack or table.unpack

local function seen(event, session)
  for _, item in ipairs(redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 16)) do
    local e, s = nil, nil
    local f = item[2]
    for j = 1, #f, 2 do
      if f[j] == 'event' then e = f[j + 1] elseif f[j] == 'session_id' then s = f[j + 1] end
    end
    if e == event and s == session then return true end
  end
  return false
end

local added = 0
local i = 4
while i <= #ARGV do
  local once, n = ARGV[i], tonumber(ARGV[i + 1])
  local fields = {}
  local event, session = nil, nil
  for j = i + 2, i + 1 + n, 2 do
    fields[#fields + 1] = ARGV[j]
    fields[#fields + 1] = ARGV[j + 1]
    if ARGV[j] == 'event' then event = ARGV[j + 1] end
    if ARGV[j] == 'session_id' then session = ARGV[j + 1] end
  end
  i = i + 2 + n
  if not (once == '1' and event and session and seen(event, session)) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack_(fields))
    added = added + 1
  end
end
if added > 0 then
  -- Exact, not '~': an approximate trim drops only whole stream nodes, so old records of
  -- a quiet identity would outlive the retention.
  redis.call('XTRIM', KEYS[1], 'MINID', tostring(now - tonumber(ARGV[2])))
  if ARGV[3] == '1' then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2])) end
end
return added
