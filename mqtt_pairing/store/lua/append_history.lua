-- append_history: add audit records, in order, to one history stream, trimmed by count as
-- they are written (docs/design.md "History"). Each record has one writer, so nothing is
-- looked up first; the age trim is off the request path (trim_history.lua, or a threshold
-- passed on a sample of writes), so no time is read.
-- KEYS[1] - history stream ({global:<n>}, {runner:<id>} or {app:<id>})
-- ARGV[1] - most entries kept (approximate trim)
-- ARGV[2] - TTL, ms: an identity's stream expires when idle this long ('' none: global)
-- ARGV[3] - drop entries older than this stream id (exact MINID trim; '' none)
-- ARGV[4..] - the records, in order, each as: n, then n items (field, value, ...)
-- returns the number of records added
local unpack_ = unpack or table.unpack
local added = 0
local i = 4
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack_(ARGV, i + 1, i + n))
  added = added + 1
  i = i + 1 + n
end
if ARGV[2] ~= '' then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2])) end
if ARGV[3] ~= '' then redis.call('XTRIM', KEYS[1], 'MINID', ARGV[3]) end
return added
