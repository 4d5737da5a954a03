-- append_history: add one audit record to a history stream, trimmed by count and age.
-- KEYS[1] - history stream ({global:<n>}, {runner:<id>} or {app:<id>})
-- ARGV[1] - most entries kept (approximate trim)
-- ARGV[2] - retention, ms (older entries are trimmed)
-- ARGV[3] - '1' to let the stream expire when idle for the retention (per-identity streams)
-- ARGV[4..] - field, value, ... of the record
-- returns the entry id
local now = now_ms()
local unpack_ = unpack or table.unpack
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack_(fields))
-- Exact, not '~': an approximate trim drops only whole stream nodes, so old records of a
-- quiet identity would outlive the retention.
redis.call('XTRIM', KEYS[1], 'MINID', tostring(now - tonumber(ARGV[2])))
if ARGV[3] == '1' then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2])) end
return id
