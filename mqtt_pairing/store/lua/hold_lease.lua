-- hold_lease: take or keep a lease (a single-holder role among instances).
-- KEYS[1] - lease key ({global:<n>})
-- ARGV[1] - holder id (instance)
-- ARGV[2] - lease length, ms
-- ARGV[3] - '1' to give the lease up (if held by this holder)
-- returns 1 if the caller holds the lease now, else 0
local cur = redis.call('GET', KEYS[1])
if ARGV[3] == '1' then
  if cur == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
