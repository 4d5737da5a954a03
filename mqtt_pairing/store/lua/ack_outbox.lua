-- ack_outbox: delete published entries from a runner's outbox; an empty outbox is removed.
-- KEYS[1] - runner outbox stream ({runner:<id>})
-- ARGV    - stream ids of the published entries
-- returns the number of entries left
local unpack_ = unpack or table.unpack
if #ARGV > 0 then redis.call('XDEL', KEYS[1], unpack_(ARGV)) end
local left = redis.call('XLEN', KEYS[1])
if left == 0 then redis.call('DEL', KEYS[1]) end
return left
