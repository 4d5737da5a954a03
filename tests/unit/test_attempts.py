"""`Attempts`: a retry takes over the pending mark of an attempt this instance abandoned
(SERVICE_UNAVAILABLE), once, while no other attempt of it runs here, and only for as long
as the pending lease could hold it (mqtt_pairing/services/attempts.py)."""

from __future__ import annotations

from mqtt_pairing.services.attempts import AttemptKey, Attempts

KEY: AttemptKey = ("app", "a1", "pair", "rid-1")
OTHER: AttemptKey = ("app", "a1", "pair", "rid-2")


def test_an_abandoned_attempt_is_taken_over_once_by_the_next_attempt() -> None:
    attempts = Attempts(11.0)
    attempts.start(KEY)
    attempts.end(KEY, abandoned=True, now_s=100.0)
    attempts.start(KEY)
    assert not attempts.take_over(OTHER, now_s=101.0)
    assert attempts.take_over(KEY, now_s=101.0)
    assert not attempts.take_over(KEY, now_s=101.0)  # once
    attempts.end(KEY, abandoned=False, now_s=101.5)
    assert len(attempts) == 0


def test_an_attempt_that_ended_well_leaves_nothing_to_take_over() -> None:
    attempts = Attempts(11.0)
    attempts.start(KEY)
    attempts.end(KEY, abandoned=False, now_s=100.0)
    attempts.start(KEY)
    assert not attempts.take_over(KEY, now_s=100.1)


def test_no_take_over_while_another_attempt_of_the_request_runs_here() -> None:
    attempts = Attempts(11.0)
    attempts.start(KEY)  # a copy still working (it owns the mark)
    attempts.start(KEY)
    attempts.end(KEY, abandoned=True, now_s=100.0)  # a second copy gave up
    attempts.start(KEY)  # the retry
    assert not attempts.take_over(KEY, now_s=100.5)
    attempts.end(KEY, abandoned=False, now_s=101.0)  # the first copy ends
    assert attempts.take_over(KEY, now_s=101.0)


def test_abandoned_attempts_are_forgotten_after_the_lease() -> None:
    attempts = Attempts(11.0)
    attempts.start(KEY)
    attempts.end(KEY, abandoned=True, now_s=100.0)
    attempts.start(KEY)
    assert not attempts.take_over(KEY, now_s=111.5)
    assert len(attempts) == 0


def test_the_number_remembered_is_bounded_oldest_first() -> None:
    attempts = Attempts(60.0, max_abandoned=2)
    keys: list[AttemptKey] = [("app", "a1", "pair", f"rid-{i}") for i in range(3)]
    for i, key in enumerate(keys):
        attempts.start(key)
        attempts.end(key, abandoned=True, now_s=100.0 + i)
    assert len(attempts) == 2
    for key in keys:
        attempts.start(key)
    assert [attempts.take_over(key, now_s=103.0) for key in keys] == [False, True, True]
