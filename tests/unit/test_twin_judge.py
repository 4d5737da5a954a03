"""The twin rules of `mqtt_pairing.twin.TwinJudge`, on its own clock (no I/O).

A twin is claimed only on evidence: DISCONNECT 0x8E, or `TWIN_CLOSES` closes within
`TWIN_WINDOW_S`, each within `SHORT_S` of the broker accepting the connection and each
followed by an accepted reconnect. Resets of long-lived connections and closes followed by
a refused reconnect (a broker restart) never count, and a plain loss clears a twin.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mqtt_pairing.twin import (
    SHORT_S,
    TWIN_CLEAR_S,
    TWIN_CLOSES,
    TWIN_WINDOW_S,
    Loss,
    TwinJudge,
    Verdict,
)

RECONNECT_S = 0.2


def fight(judge: TwinJudge, now: float, closes: int, up_s: float = 0.5) -> float:
    """`closes` connections each closed `up_s` after being accepted, each reconnected."""
    for _ in range(closes):
        judge.connected(now)
        now += up_s
        judge.lost(now, Loss.CLOSED)
        now += RECONNECT_S
    return now


def twin_judge() -> tuple[TwinJudge, float]:
    judge = TwinJudge()
    now = fight(judge, 0.0, TWIN_CLOSES)
    assert judge.connected(now)  # the last close counts at the accepted reconnect
    assert judge.twin(now)
    return judge, now


@given(
    ups=st.lists(st.floats(SHORT_S, 3 * TWIN_CLEAR_S), min_size=1, max_size=40),
    downs=st.lists(st.floats(0.0, 30.0), min_size=40, max_size=40),
)
def test_resets_of_long_lived_connections_are_never_a_twin(
    ups: list[float], downs: list[float]
) -> None:
    judge, now = TwinJudge(), 1000.0
    for up_s, down_s in zip(ups, downs, strict=False):
        assert not judge.connected(now)
        now += up_s
        assert judge.lost(now, Loss.CLOSED) is Verdict.PLAIN
        assert not judge.twin(now)
        now += down_s
    assert not judge.connected(now)
    assert not judge.twin(now)


@given(
    ups=st.lists(st.floats(0.0, 3 * SHORT_S), min_size=1, max_size=40),
    how=st.sampled_from([Loss.CLOSED, Loss.DISCONNECT, Loss.TIMEOUT]),
)
def test_losses_followed_by_a_refused_reconnect_are_never_a_twin(
    ups: list[float], how: Loss
) -> None:
    judge, now = TwinJudge(), 0.0
    for up_s in ups:
        assert not judge.connected(now)
        now += up_s
        assert judge.lost(now, how) is Verdict.PLAIN
        now += RECONNECT_S
        judge.connect_failed()  # the broker restarting
        now += RECONNECT_S
        assert not judge.twin(now)


@given(ups=st.lists(st.floats(0.0, TWIN_CLEAR_S + 10.0), min_size=1, max_size=30))
def test_a_twin_needs_enough_short_closes_in_the_window(ups: list[float]) -> None:
    """Connections up `ups[i]` s, each closed and reconnected at once; no other event."""
    judge, now = TwinJudge(), 0.0
    shorts: list[float] = []  # short closes since the last connection that cleared
    assert not judge.connected(now)
    for up_s in ups:
        was_twin = judge.twin(now)
        now += up_s
        if up_s >= TWIN_CLEAR_S:
            shorts, was_twin = [], False
        verdict = judge.lost(now, Loss.CLOSED)
        assert (verdict is Verdict.TAKEOVER) == (was_twin and up_s < SHORT_S)
        closed = now
        if up_s < SHORT_S:
            shorts.append(closed)
        now += RECONNECT_S
        made = judge.connected(now)
        in_window = [t for t in shorts if shorts[-1] - t <= TWIN_WINDOW_S] if shorts else []
        if made:
            # Evidence: enough short closes, the last one just now, within the window.
            assert not was_twin
            assert len(in_window) >= TWIN_CLOSES
            assert shorts[-1] == closed
        if len(in_window) >= TWIN_CLOSES and up_s < SHORT_S:
            assert judge.twin(now)
        if not shorts:
            assert not judge.twin(now)


def test_three_short_closes_with_accepted_reconnects_make_a_twin() -> None:
    judge = TwinJudge()
    now = fight(judge, 0.0, TWIN_CLOSES - 1)
    assert not judge.connected(now)
    assert not judge.twin(now)
    now += 0.5
    assert judge.lost(now, Loss.CLOSED) is Verdict.PLAIN  # not known until the reconnect
    now += RECONNECT_S
    assert judge.connected(now)
    assert judge.twin(now)
    # The next short close is a takeover at once: back off.
    assert judge.lost(now + 0.5, Loss.CLOSED) is Verdict.TAKEOVER


def test_session_taken_over_is_a_twin_at_once() -> None:
    judge = TwinJudge()
    judge.connected(0.0)
    assert judge.lost(100.0, Loss.TAKEN_OVER) is Verdict.TAKEOVER
    assert judge.twin(100.0)


def test_a_long_lived_close_while_a_twin_is_believed_reconnects_at_once() -> None:
    judge, now = twin_judge()
    assert judge.lost(now + 60.0, Loss.CLOSED) is Verdict.PLAIN
    assert judge.twin(now + 60.0)  # kept, not cleared: no evidence either way


def test_a_broker_restart_after_the_twin_left_clears_it() -> None:
    """The sticky twin of the report: a broker restart (refused reconnect) is plain."""
    judge, now = twin_judge()
    now += 30.0
    assert judge.lost(now, Loss.CLOSED) is Verdict.PLAIN
    judge.connect_failed()
    assert not judge.twin(now)
    # Back after the restart: a later reset of a long-lived connection stays plain.
    assert not judge.connected(now + 2.0)
    assert judge.lost(now + 20.0, Loss.CLOSED) is Verdict.PLAIN
    assert not judge.connected(now + 20.2)
    assert not judge.twin(now + 20.2)


def test_other_disconnect_reasons_and_timeouts_clear_a_twin() -> None:
    for how in (Loss.DISCONNECT, Loss.TIMEOUT):
        judge, now = twin_judge()
        assert judge.lost(now + 0.5, how) is Verdict.PLAIN
        assert not judge.twin(now + 0.5)


def test_a_connection_up_long_enough_clears_a_twin() -> None:
    judge, now = twin_judge()
    assert judge.twin(now + TWIN_CLEAR_S - 1.0)
    assert not judge.twin(now + TWIN_CLEAR_S)
    # and the evidence went with it: one more short close is not a twin
    now = fight(judge, now + TWIN_CLEAR_S + 1.0, 1)
    assert not judge.connected(now)
    assert not judge.twin(now)


def test_an_error_without_a_reason_code_neither_counts_nor_clears() -> None:
    judge, now = twin_judge()
    assert judge.lost(now + 0.5, Loss.UNKNOWN) is Verdict.PLAIN
    assert not judge.connected(now + 0.7)
    assert judge.twin(now + 0.7)
    fresh = TwinJudge()
    now = 0.0
    for _ in range(2 * TWIN_CLOSES):
        fresh.connected(now)
        fresh.lost(now + 0.5, Loss.UNKNOWN)
        now += 1.0
    assert not fresh.connected(now)
    assert not fresh.twin(now)
