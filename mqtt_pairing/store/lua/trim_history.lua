-- trim_history: drop the records of a history stream older than the retention (exact
-- MINID trim), off the request path: the outbox sweep runs it on each global shard about
-- once a minute (services/outbox.py); identity streams are trimmed by age on a sample of
-- their writes and expire when idle (docs/design.md "History").
-- KEYS[1] - history stream
-- ARGV[1] - retention, ms
-- returns the number of records trimmed
return redis.call('XTRIM', KEYS[1], 'MINID', tostring(now_ms() - tonumber(ARGV[1])))
