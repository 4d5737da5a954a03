-- clear_runner_code: the runner no longer has an active code (cancel-code, runner ban).
-- The runner's slot decides whether the code was live: a pair's session opens here only
-- while the code is the runner's (open_session), so the order of the two in this slot is
-- the order of the race. A use is spent once its session opened (code_opened, counted by
-- open_session); a use claimed in the code's slot whose session has not opened is not:
-- from now on it cannot open, and it is given back.
-- KEYS[1] - runner hash ({runner:<id>})
-- returns {digest of the code that was active or '', live}: live 1 if the code had not
--         expired and fewer sessions had opened with it than its uses, 0 if not, -1 if the
--         hash does not say (a code set before the runner hash counted uses: ask the
--         code's own slot, end_code)
local r = redis.call('HMGET', KEYS[1], 'code', 'code_expires_ms', 'code_max', 'code_opened')
if not r[1] then return {'', 0} end
redis.call('HDEL', KEYS[1], 'code', 'code_expires_ms', 'code_max', 'code_opened')
if not r[3] then return {r[1], -1} end
local live = 0
if now_ms() < tonumber(r[2] or '0') and tonumber(r[4] or '0') < tonumber(r[3]) then live = 1 end
return {r[1], live}
