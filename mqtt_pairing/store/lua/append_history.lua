-- append_history: add one audit record to a history stream, trimmed by count and age.
-- KEYS[1] - history stream ({global:<n>}, {runner:<id>} or {app:<id>})
-- ARGV[1] - most entries kept (approximate trim)
-- ARGV[2] - retention, ms (older entries are trimmed)
-- ARGV[3] - '1' to let the stream expire when idle for the retention (per-identity streams)
-- ARGV[4] - '1' to skip the record when one of the stream's last 16 entries has the same
--           'event' and 'session_id' (a session's events can be recorded by two writers:
--           the pair itself and whichever delivery deleted the outbox entry; the first wins)
-- ARGV[5..] - field, value, ... of the record
-- returns the entry id, or false when skipped
local now = now_ms()
local unpack_ = unpack or table.unpack
local fields = {}
local event, session = nil, nil
for i = 5, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
  if ARGV[i] == 'event' then event = ARGV[i + 1] end
  if ARGV[i] == 'session_id' then session = ARGV[i + 1] end
end
if ARGV[4] == '1' and event and session then
  for _, item in ipairs(redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 16)) do
    local e, s = nil, nil
    local f = item[2]
    for j = 1, #f, 2 do
      if f[j] == 'event' then e = f[j + 1] elseif f[j] == 'session_id' then s = f[j + 1] end
    end
    if e == event and s == session then return false end
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack_(fields))
-- Exact, not '~': an approximate trim drops only whole stream nodes, so old records of a
-- quiet identity would outlive the retention.
redis.call('XTRIM', KEYS[1], 'MINID', tostring(now - tonumber(ARGV[2])))
if ARGV[3] == '1' then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2])) end
return id
