"""Sans-I/O tests of the orchestrator's holder liveness (gtbus.protocol.liveness): backoff, reconnects, absence."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gtbus.protocol.liveness import HolderLiveness, WhileAway

T = 1000.0  # monotonic seconds


def live() -> HolderLiveness:
    return HolderLiveness(backoff_min=0.25, backoff_max=1.0, absent_timeout=10.0)


def test_backoff_doubles_up_to_the_cap_and_a_reach_clears_it() -> None:
    lv = live()
    assert lv.reachable("h1", T, -1.0)
    waits = []
    t = T
    for _ in range(5):
        lv.unreached("h1", t)
        assert not lv.reachable("h1", t, -1.0)
        step = 0.0
        while not lv.reachable("h1", t + step, -1.0):
            step += 0.05
        waits.append(round(step, 2))
        t += step
    assert waits == [0.25, 0.5, 1.0, 1.0, 1.0]
    lv.reached("h1")
    assert lv.reachable("h1", t, -1.0) and not lv.gone("h1", t + 100, -1.0)


def test_a_holder_heard_since_its_failure_is_retried_after_the_minimum() -> None:
    lv = live()
    for k in range(3):
        lv.unreached("h1", T + k)  # backoff now 1.0, last failure at T + 2
    assert not lv.reachable("h1", T + 2.3, T + 1.0)  # heard before the failure: still backing off
    assert lv.reachable("h1", T + 2.3, T + 2.1)  # it reconnected since
    assert not lv.reachable("h1", T + 2.1, T + 2.05)  # but not before backoff_min


def test_gone_counts_from_the_first_failure_or_the_last_word() -> None:
    lv = live()
    lv.unreached("h1", T)
    lv.unreached("h1", T + 5)
    assert not lv.gone("h1", T + 9.9, -1.0)
    assert lv.gone("h1", T + 10, -1.0)  # since the first failure, not the last
    assert not lv.gone("h1", T + 10, T + 3)  # heard at T + 3: quiet only for 7 s


def test_while_away_waits_gives_up_or_stops() -> None:
    lv = live()
    lv.unreached("h1", T)
    lv.unreached("h2", T)
    everyone = ["h1", "h2", "h3"]
    assert lv.while_away(["h1"], everyone, T + 0.1, {}) is WhileAway.WAIT
    assert lv.while_away(["h1"], everyone, T + 0.3, {}) is WhileAway.GO_ON
    for k in range(11):  # retried every second, never reached
        lv.unreached("h1", T + k)
        lv.unreached("h2", T + k)
    assert lv.while_away(["h1", "h2"], everyone, T + 9.5, {}) is WhileAway.WAIT
    # Both gone; h3 (no work left) spoke recently: give up on them for this round.
    assert lv.while_away(["h1", "h2"], everyone, T + 10.5, {"h3": T + 9}) is WhileAway.GIVE_UP
    # Nobody of the run was heard from for the absent timeout: stop, with a reason, resumable.
    assert lv.while_away(["h1", "h2"], everyone, T + 10.5, {"h3": T - 1}) is WhileAway.STOP
    assert lv.while_away(["h1", "h2"], everyone, T + 10.5, {}) is WhileAway.STOP


@pytest.mark.parametrize(("lo", "hi", "absent"), [(0.0, 1.0, 1.0), (2.0, 1.0, 1.0), (0.1, 1.0, 0.0)])
def test_bad_settings_are_refused(lo: float, hi: float, absent: float) -> None:
    with pytest.raises(ValueError):
        HolderLiveness(lo, hi, absent)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["fail", "reach", "hear"]), st.floats(0, 5)), max_size=30))
def test_a_holder_is_never_passed_over_longer_than_the_cap_after_its_last_failure(steps: list[tuple[str, float]]) -> None:
    lv, t, heard = live(), T, -1.0
    last_fail = None
    for what, dt in steps:
        t += dt
        if what == "fail":
            lv.unreached("h1", t)
            last_fail = t
        elif what == "reach":
            lv.reached("h1")
            last_fail = None
        else:
            heard = t
        if last_fail is None:
            assert lv.reachable("h1", t, heard)
        else:
            assert lv.reachable("h1", last_fail + lv.backoff_max, heard)
            assert not lv.reachable("h1", last_fail, heard)
