-- active_session: one active session of a runner, read only (the `message` op checks the
-- session it relays for; docs/protocol.md "Runner and app message"). Writes nothing.
-- KEYS[1] - runner sessions hash ({runner:<id>})
-- ARGV[1] - session id
-- returns {session JSON or false, now (ms)}
return {redis.call('HGET', KEYS[1], ARGV[1]), now_ms()}
