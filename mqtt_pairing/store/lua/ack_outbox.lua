-- ack_outbox: delete published entries from a runner's outbox; an empty outbox is removed.
-- KEYS[1] - runner outbox stream ({runner:<id>})
-- ARGV    - stream ids of the published entries
-- returns {entries left, ids this call deleted} (an id another delivery deleted first is
-- not in the list: that delivery records it in the history)
local deleted = {}
for i = 1, #ARGV do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then deleted[#deleted + 1] = ARGV[i] end
end
local left = redis.call('XLEN', KEYS[1])
if left == 0 then redis.call('DEL', KEYS[1]) end
return {left, deleted}
