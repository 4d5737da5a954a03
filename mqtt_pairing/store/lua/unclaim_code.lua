-- unclaim_code: give back a use whose session could not open (docs/design.md step 4).
-- KEYS[1] - code hash ({c:<group>}, store/keys.py)
-- KEYS[2] - claims hash of the code
-- ARGV[1] - claim field: app_id .. '\n' .. request_id
-- returns 1 if a use was given back, else 0
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
local c = redis.call('HMGET', KEYS[1], 's', 'u', 'z')  -- field names: issue_code.lua
if not c[1] then return 0 end
redis.call('HSET', KEYS[1], 'u', tonumber(c[2]) + 1)
-- a used-up code comes back to life, unless it was replaced or cancelled meanwhile (z)
if c[1] == 'used' then redis.call('HSET', KEYS[1], 's', c[3] or 'active') end
return 1
