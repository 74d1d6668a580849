"""`replay --redrive` re-drives the orchestrator's hops through the hop machine.

Logs are written with real keys and the real recorder: a clean log with every
kind of hop (trained, declined, revoked, rejected, rolled back, undelivered,
and one whose device agent never staged) re-drives with no difference; each
doctored log (a revocation before the lease ran out, a trained record for a
return of another chunk, a missing revoke, a decline turned into a training)
is pointed at exactly, at the hop record that disagrees.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gtbus.messages.signer import MessageSigner
from gtbus.messages.types import AgentStage, HopRecord, TokenAck, TokenDecline, TokenGrant, TokenReturn, TokenRevoke
from gtbus.recording import Recorder, read_log
from gtbus.replay.redrive import redrive
from gtbus.testing import make_deployment

TOKEN = "tok0"


@dataclass
class Hop:
    """One scripted hop of an orchestrator's log."""

    outcome: str  # what the hop record says
    chunk: int = 0
    returned_chunk: int | None = None  # None: no return
    declined: bool = False
    lease: float = 10.0  # seconds from the grant to its deadline (negative: already over)
    revoke_to_holder: bool = False
    via: str | None = None  # a device agent staged the hop
    grant_sent: bool = True  # False: the agent refused, the grant never left
    acked: bool = True
    revoke_to_agent: bool | None = None  # None: as the orchestrator does (a hop that ended before its return)


def write_log(tmp: Path, hops: list[Hop]) -> tuple[Path, list[int]]:
    """The orchestrator's log of ``hops`` (holder h1, epochs 1..n); the index of each hop record."""
    dep = make_deployment(tmp / "keys", holders=1, agents=1) if any(h.via for h in hops) else make_deployment(tmp / "keys", holders=1)
    orch, h1 = MessageSigner(dep.orchestrator), MessageSigner(dep.holders[0])
    path = tmp / "orch.gtlog"
    rec = Recorder(path, "orch", dep.roster)
    records = []
    for epoch, hop in enumerate(hops, start=1):
        now = time.time()
        if hop.via:
            rec.record("out", orch.sign(AgentStage(TOKEN, "h1", b"sealed", 4096, 1024), hop.via, epoch=epoch)[1], "sent")
        if hop.grant_sent:
            grant = TokenGrant(TOKEN, "run", "h1", hop.chunk, "travel", now + hop.lease, b"sealed", {})
            rec.record("out", orch.sign(grant, "h1", epoch=epoch)[1], "sent")
        if hop.acked and hop.grant_sent:
            rec.record("in", h1.sign(TokenAck(TOKEN), "orch", epoch=epoch)[1], "accepted")
        if hop.declined:
            rec.record("in", h1.sign(TokenDecline(TOKEN, "measurement not pinned"), "orch", epoch=epoch)[1], "accepted")
        if hop.returned_chunk is not None:
            rec.record("in", h1.sign(TokenReturn(TOKEN, hop.returned_chunk, 1, 10, b"d" * 32, bytes(32)), "orch", epoch=epoch)[1], "accepted")
        if hop.revoke_to_holder:
            rec.record("out", orch.sign(TokenRevoke(TOKEN, "over"), "h1", epoch=epoch)[1], "sent")
        to_agent = hop.outcome in ("revoked", "declined", "undelivered") if hop.revoke_to_agent is None else hop.revoke_to_agent
        if hop.via and to_agent:
            rec.record("out", orch.sign(TokenRevoke(TOKEN, "over"), hop.via, epoch=epoch)[1], "sent")
        rec.record("out", orch.sign(HopRecord(epoch, "h1", hop.chunk, hop.outcome, {"nbytes": 10}), "*", epoch=epoch)[1], "sent", channel="event")
        records.append(read_log(path)[-1].index)
    rec.close()
    return path, records


CLEAN = [
    Hop("trained", chunk=0, returned_chunk=0),
    Hop("declined", chunk=1, declined=True, revoke_to_holder=True),
    Hop("revoked", chunk=1, lease=-0.5, revoke_to_holder=True),
    Hop("rejected", chunk=1, returned_chunk=3),  # the return names another chunk
    Hop("rejected", chunk=1, returned_chunk=1),  # a segment did not authenticate (the device says so)
    Hop("rolled-back", chunk=2, returned_chunk=2),
    Hop("undelivered", chunk=2, acked=False),
    Hop("undelivered", chunk=2, via="a1", grant_sent=False, acked=False),
    Hop("revoked", chunk=2, via="a1", lease=-0.5, revoke_to_holder=True),
    Hop("trained", chunk=2, via="a1", returned_chunk=2),
]


def test_clean_log_with_every_kind_of_hop(tmp_path: Path) -> None:
    path, _ = write_log(tmp_path, CLEAN)
    assert redrive(path) == ("orch", None)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (Hop("revoked", chunk=1, lease=30.0, revoke_to_holder=True), "says revoked at"),
        (Hop("trained", chunk=1, returned_chunk=4), "the state machine decides rejected, the log shows trained"),
        (Hop("trained", chunk=1, declined=True, revoke_to_holder=True), "the state machine decides declined, the log shows trained"),
        (Hop("declined", chunk=1, declined=True), "revokes the token at h1; the log shows no token.revoke"),
        (Hop("trained", chunk=1), "says trained, but the state machine accepted no return"),
        (Hop("revoked", chunk=1, returned_chunk=1), "the state machine decides nothing yet (phase opening), the log shows revoked"),
    ],
    ids=["early-revoke", "other-chunk-trained", "declined-trained", "no-revoke", "no-return", "return-then-revoked"],
)
def test_doctored_hop_is_found_at_its_record(tmp_path: Path, bad: Hop, message: str) -> None:
    path, records = write_log(tmp_path, [CLEAN[0], bad, CLEAN[0]])
    name, diff = redrive(path)
    assert name == "orch" and diff is not None
    assert diff.record == records[1], diff
    assert message in diff.message, diff.message


def test_agent_revoke_missing_is_found(tmp_path: Path) -> None:
    path, records = write_log(tmp_path, [Hop("declined", via="a1", declined=True, revoke_to_holder=True, revoke_to_agent=False)])
    _, diff = redrive(path)
    assert diff is not None and diff.record == records[0]
    assert "revokes the token at a1; the log shows no token.revoke" in diff.message


HOP = st.builds(
    Hop,
    outcome=st.sampled_from(["trained", "declined", "revoked", "rejected", "rolled-back", "undelivered", "", "x" * 300]),
    chunk=st.one_of(st.integers(0, 3), st.integers(-(1 << 63), (1 << 64) - 1)),
    returned_chunk=st.one_of(st.none(), st.integers(0, 3), st.integers(-(1 << 63), (1 << 64) - 1)),
    declined=st.booleans(),
    lease=st.one_of(st.floats(-5, 30), st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e300])),
    revoke_to_holder=st.booleans(),
    via=st.sampled_from([None, "a1"]),
    grant_sent=st.booleans(),
    acked=st.booleans(),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hops=st.lists(HOP, min_size=1, max_size=5))
def test_any_hop_script_redrives_without_raising(tmp_path_factory: pytest.TempPathFactory, hops: list[Hop]) -> None:
    path, records = write_log(tmp_path_factory.mktemp("any"), hops)
    name, diff = redrive(path)
    assert name == "orch"
    assert diff is None or (diff.record >= 0 and diff.message and "\n" not in diff.message)
