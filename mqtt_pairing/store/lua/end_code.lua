-- end_code: mark a code replaced or cancelled (answers CODE_ALREADY_USED from then on).
-- A used-up code keeps its state, and remembers the end in 'z': a use claimed but not
-- yet opened is given back (unclaim_code) to the ended state, not to 'active'.
-- KEYS[1] - code hash ({c:<group>}, store/keys.py)
-- ARGV[1] - new state: 'replaced' | 'cancelled'
-- ARGV[2] - runner_id the code must belong to
-- returns 1 if the code was active and not expired, else 0 (what the code's slot knows: a
--         use claimed here whose session will not open counts as used, see
--         clear_runner_code.lua for the answer a cancel gives)
local c = redis.call('HMGET', KEYS[1], 's', 'r', 'e')  -- field names: issue_code.lua
if not c[1] or c[2] ~= ARGV[2] then return 0 end
local live = 0
if c[1] == 'active' then
  if tonumber(c[3]) > now_ms() then live = 1 end
  redis.call('HSET', KEYS[1], 's', ARGV[1])
elseif c[1] == 'used' then
  redis.call('HSET', KEYS[1], 'z', ARGV[1])
end
return live
