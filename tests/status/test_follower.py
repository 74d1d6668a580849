"""The Clone-pattern follower: buffer until snapshot, drop what the snapshot covers, apply the rest."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gtbus.messages.types import Heartbeat, HopRecord, HopReport, RunComplete, TokenState
from gtbus.protocol.follower import EventFollower


def _hop(epoch: int, holder: str = "h1", outcome: str = "trained", nbytes: int = 100) -> HopRecord:
    return HopRecord(epoch, holder, 0, outcome, {"nbytes": nbytes})


def _report(epoch: int, holder: str = "h1", outcome: str = "trained") -> HopReport:
    return HopReport(epoch, holder, 0, outcome, {"nbytes": 100, "eval_before": 2.5 - epoch * 0.1, "eval_after": 2.4 - epoch * 0.1, "detail": ""})


def test_events_before_snapshot_are_buffered_then_filtered_by_sequence() -> None:
    f = EventFollower()
    assert not f.on_event(5, _hop(1))  # covered by the snapshot below
    assert not f.on_event(6, _hop(2))  # newer: applied once synced
    assert f.state is None and not f.synced
    f.on_snapshot({"hops": 1, "hops_trained": 1, "bytes": 100}, event_seq=5)
    assert f.synced
    assert f.state is not None
    assert f.state["hops"] == 2 and f.state["bytes"] == 200
    assert f.applied_seq == 6


def test_events_at_or_below_the_snapshot_never_apply_twice() -> None:
    f = EventFollower()
    f.on_snapshot({"hops": 3, "bytes": 300}, event_seq=10)
    assert not f.on_event(9, _hop(3))
    assert not f.on_event(10, _hop(3))
    assert f.on_event(11, _hop(4, outcome="rejected"))
    assert f.state is not None
    assert f.state["hops"] == 4 and f.state["bytes"] == 300  # a rejected hop adds no bytes
    assert f.state["last_hop"]["outcome"] == "rejected"


def test_token_state_and_completion() -> None:
    f = EventFollower()
    f.on_snapshot({}, event_seq=0)
    f.on_event(1, TokenState("t", "h2", 7, "granted"))
    f.on_event(2, RunComplete({"hops": 7}))
    assert f.state is not None
    assert f.state["token"] == {"id": "t", "owner": "h2", "epoch": 7, "phase": "granted"}
    assert f.state["complete"] and f.state["summary"] == {"hops": 7}


def test_a_new_snapshot_replaces_state() -> None:
    f = EventFollower()
    f.on_snapshot({"hops": 1}, event_seq=1)
    f.on_event(2, _hop(2))
    f.on_snapshot({"hops": 9}, event_seq=20)
    assert f.state is not None and f.state["hops"] == 9
    assert not f.on_event(15, _hop(3))


def test_reports_set_the_loss_by_epoch_and_wait_for_the_snapshot() -> None:
    f = EventFollower()
    assert not f.on_report(_report(3))  # before the snapshot: kept, applied after it
    f.on_snapshot({"last_loss": 9.0, "last_loss_epoch": 2}, event_seq=0)
    assert f.state is not None and f.state["last_loss"] == 2.2 and f.state["last_loss_epoch"] == 3
    assert f.on_report(_report(1))  # older than what is shown: the loss stays
    assert f.state["last_loss"] == 2.2 and f.state["last_report"]["epoch"] == 1
    f.on_report(_report(4, outcome="rejected"))  # a refused hop trained nothing: no loss from it
    assert f.state["last_loss_epoch"] == 3
    f.on_snapshot({"hops": 5}, event_seq=9)  # a refreshed snapshot keeps the last direct report
    assert f.state["last_report"]["epoch"] == 4


def test_the_whole_summary_survives_the_public_one_in_either_order() -> None:
    full = {"hops": 7, "last_loss": 1.5}
    for first, second in ((full, {"hops": 7}), ({"hops": 7}, full)):
        f = EventFollower()
        f.on_snapshot({}, event_seq=0)
        if first is full:
            f.on_report(RunComplete(first))
            f.on_event(1, RunComplete(second))
        else:
            f.on_event(1, RunComplete(first))
            f.on_report(RunComplete(second))
        assert f.state is not None and f.state["complete"] and f.state["summary"] == full


# Field values as a peer could put them in a signed body: huge, negative, wrong types, nested.
_any = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=4,
)
_keys = st.sampled_from(["nbytes", "eval_before", "eval_after", "detail", "hops", "hops_trained", "bytes", "last_loss_epoch", "summary", "x"])
_record = st.dictionaries(_keys, _any, max_size=6)
_int = st.integers(-(1 << 63), (1 << 64) - 1)
_text = st.text(max_size=12)
_messages = st.one_of(
    st.builds(HopRecord, _int, _text, _int, st.sampled_from(["trained", "rejected", "x"]) | _text, _record),
    st.builds(HopReport, _int, _text, _int, st.sampled_from(["trained", "rejected"]) | _text, _record),
    st.builds(RunComplete, _record),
    st.builds(TokenState, _text, _text, _int, _text),
    st.builds(Heartbeat, _text, st.floats()),
)


@settings(max_examples=150, deadline=None)
@given(snapshot=_record, events=st.lists(st.tuples(st.booleans(), _int, _messages), max_size=12))
def test_any_field_values_leave_a_usable_state(snapshot: dict[str, Any], events: list[tuple[bool, int, object]]) -> None:
    """Whatever values the records carry, following never raises and the counters stay counts."""
    f = EventFollower()
    for i, (direct, seq, msg) in enumerate(events):
        if i == len(events) // 2:
            f.on_snapshot(snapshot, event_seq=seq)
        if direct and isinstance(msg, (HopReport, RunComplete)):
            f.on_report(msg)
        else:
            f.on_event(seq, msg)
    f.on_snapshot(snapshot, event_seq=0)
    assert f.state is not None
    for k in ("hops", "hops_trained", "bytes"):
        # The snapshot's own value is kept as given (identity: a NaN is not equal to itself).
        assert k not in f.state or f.state[k] is snapshot.get(k) or f.state[k] == snapshot.get(k) or (type(f.state[k]) is int and f.state[k] >= 0)
    if "last_loss" in f.state and f.state.get("last_report"):
        assert f.state["last_loss"] is None or isinstance(f.state["last_loss"], (int, float)) or f.state["last_loss"] == snapshot.get("last_loss")


def test_a_snapshot_that_comes_after_newer_events_is_brought_forward_not_taken_back() -> None:
    # A liveness refresh: the reply (taken at 6) travels apart from the broadcast and comes
    # after events 7 and 8 were applied. The state keeps them, completion included.
    f = EventFollower()
    f.on_snapshot({"hops": 5, "hops_trained": 5, "bytes": 500}, event_seq=5, session=b"s1")
    f.on_event(6, _hop(6))
    f.on_event(7, _hop(7))
    f.on_event(8, RunComplete({"hops": 7}))
    f.on_snapshot({"hops": 6, "hops_trained": 6, "bytes": 600, "liveness": {"h1": 0.5}}, event_seq=6, session=b"s1")
    assert f.state is not None
    assert f.state["hops"] == 7 and f.state["bytes"] == 700 and f.state["complete"]
    assert f.state["liveness"] == {"h1": 0.5}  # what the refresh was for
    assert f.applied_seq == 8
    # The next fresh snapshot replaces it as before.
    f.on_snapshot({"hops": 7, "complete": True}, event_seq=8, session=b"s1")
    assert f.state["hops"] == 7 and f.applied_seq == 8


def test_a_snapshot_older_than_the_last_one_is_dropped() -> None:
    f = EventFollower()
    f.on_snapshot({"hops": 9}, event_seq=9, session=b"s1")
    f.on_event(10, _hop(10))
    f.on_snapshot({"hops": 3}, event_seq=3, session=b"s1")  # a reply that took very long
    assert f.state is not None and f.state["hops"] == 10 and f.snapshot_seq == 9


def test_a_completed_run_stays_complete() -> None:
    f = EventFollower()
    f.on_snapshot({"hops": 2}, event_seq=2, session=b"s1")
    f.on_report(RunComplete({"hops": 2, "last_loss": 1.0}))  # direct, outside the sequence
    f.on_snapshot({"hops": 2, "complete": False}, event_seq=2, session=b"s1")
    assert f.state is not None and f.state["complete"] and f.state["summary"]["last_loss"] == 1.0


def test_a_restarted_orchestrators_snapshot_replaces_the_state() -> None:
    # Sequence numbers are per process: the resumed orchestrator counts from 0 again.
    f = EventFollower()
    f.on_snapshot({"hops": 40}, event_seq=40, session=b"s1")
    f.on_event(41, _hop(41))
    f.on_snapshot({"hops": 41}, event_seq=1, session=b"s2")
    assert f.state is not None and f.state["hops"] == 41 and f.snapshot_seq == 1
    assert f.on_event(2, _hop(42))
    assert f.state["hops"] == 42


def test_the_summary_counts_a_last_hop_whose_event_it_overtook() -> None:
    # The run's end is a direct report; the last hop's event comes on the pub socket and can arrive after it.
    f = EventFollower()
    f.on_snapshot({"hops": 6, "hops_trained": 6, "bytes": 600}, event_seq=6, session=b"s1")
    f.on_event(7, _hop(7))
    f.on_report(RunComplete({"hops": 8, "hops_trained": 8, "bytes_provisioned": 800}))
    assert f.state is not None and f.state["complete"]
    assert (f.state["hops"], f.state["hops_trained"], f.state["bytes"]) == (8, 8, 800)
    f.on_event(8, _hop(8))  # the overtaken event: already in the summary's counts
    assert (f.state["hops"], f.state["hops_trained"], f.state["bytes"]) == (8, 8, 800)
    f.on_snapshot({"hops": 7, "hops_trained": 7, "bytes": 700}, event_seq=7, session=b"s1")  # a refresh sent before the end
    assert (f.state["hops"], f.state["hops_trained"], f.state["bytes"]) == (8, 8, 800)


def test_a_summary_with_bad_counters_leaves_the_counted_ones() -> None:
    f = EventFollower()
    f.on_snapshot({"hops": 2, "hops_trained": 2, "bytes": 200}, event_seq=2)
    f.on_report(RunComplete({"hops": -1, "hops_trained": "8", "bytes_provisioned": 2.5}))
    assert f.state is not None and f.state["complete"]
    assert (f.state["hops"], f.state["hops_trained"], f.state["bytes"]) == (2, 2, 200)
