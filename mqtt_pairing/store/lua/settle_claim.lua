-- settle_claim: the session of a claimed use opened, so the use will not be given back;
-- other claimers of the used-up code need not wait for it (claim_code's 'busy').
-- KEYS[1] - claims hash of the code ({c:<group>})
-- ARGV[1] - claim field: app_id .. '\n' .. request_id
-- returns 1 if the claim was settled now, else 0
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local sid, at = string.match(v, '^([^\t]*)\t(%d+)$')
if not sid then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], sid)
return 1
