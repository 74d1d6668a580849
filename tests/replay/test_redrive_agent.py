"""`gtbus replay --redrive` of a device agent (both its logs) and of a holder's returns: clean logs agree, doctored ones are pointed at."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gtbus.gpu.channel import TAG_SIZE
from gtbus.messages.signer import MessageSigner
from gtbus.messages.types import AgentDone, AgentReady, AgentStage, AgentWritten, Refusal, ShipSegment, TokenAck, TokenGrant, TokenReturn, TokenRevoke
from gtbus.recording import Recorder, read_log
from gtbus.replay.redrive import redrive
from gtbus.testing import make_deployment

TOKEN = "tok0"
SEG = 64
STRIDE = SEG + TAG_SIZE


def _agent_logs(tmp: Path, *, plant: str = "") -> tuple[Path, int | None]:
    """An agent's two logs for one staged hop of h1 (3 segments); ``plant`` doctors one answer. Returns (up log, planted record)."""
    dep = make_deployment(tmp / "keys", holders=2, agents=1)
    orch, agent, h1 = MessageSigner(dep.orchestrator), MessageSigner(dep.agents[0]), MessageSigner(dep.holders[0])
    logs = tmp / "logs"
    up = Recorder(logs / "agent1.gtlog", "agent1", dep.roster)
    down = Recorder(logs / "agent1-holders.gtlog", "agent1", dep.roster)
    planted = None
    staging_bytes = 2 * STRIDE if plant == "written-beyond-the-staging" else 3 * STRIDE
    hs, stage = orch.sign(AgentStage(TOKEN, "h1", b"sealed", staging_bytes, SEG), "agent1", epoch=7)
    up.record("in", stage, "accepted")
    _, ready = agent.sign(AgentReady(TOKEN), "orch", epoch=7, parent=hs.id)
    up.record("out", ready, "sent")
    sent = 2 if plant == "written-with-a-segment-missing" else 3
    for i in range(sent):
        _, seg = h1.sign(ShipSegment(TOKEN, i, 3), "agent1", epoch=7, blobs=[b"c" * STRIDE])
        down.record("in", seg, "accepted")
    hd, done = h1.sign(AgentDone(TOKEN, 3, 3 * SEG), "agent1", epoch=7)
    down.record("in", done, "accepted")
    planted = read_log(logs / "agent1-holders.gtlog")[-1].index if plant else None
    answer = Refusal("agent-missing", "received 2 of 3 segments") if plant == "missing-when-complete" else AgentWritten(TOKEN, 3, 3 * SEG)
    _, written = agent.sign(answer, "h1", epoch=7, parent=hd.id)
    down.record("out", written, "sent")
    up.close()
    down.close()
    return logs / "agent1.gtlog", planted


def test_clean_agent_logs_have_no_difference_given_either(tmp_path: Path) -> None:
    path, _ = _agent_logs(tmp_path)
    assert redrive(path) == ("agent1", None)
    assert redrive(path.with_name("agent1-holders.gtlog")) == ("agent1", None)


@pytest.mark.parametrize(
    "plant, says",
    [
        ("written-with-a-segment-missing", "answers refusal agent-missing, the log shows agent.written"),
        ("missing-when-complete", "answers agent.written, the log shows refusal agent-missing"),
        # The third segment lies past the staging the orchestrator announced: never written.
        ("written-beyond-the-staging", "answers refusal agent-missing, the log shows agent.written"),
    ],
)
def test_doctored_agent_answers_are_found(tmp_path: Path, plant: str, says: str) -> None:
    path, index = _agent_logs(tmp_path, plant=plant)
    name, diff = redrive(path)
    assert name == "agent1" and diff is not None and says in diff.message, diff
    assert diff.record == index


def test_ready_for_a_stage_whose_sizes_are_unusable_is_found(tmp_path: Path) -> None:
    dep = make_deployment(tmp_path / "keys", holders=1, agents=1)
    orch, agent = MessageSigner(dep.orchestrator), MessageSigner(dep.agents[0])
    up = Recorder(tmp_path / "agent1.gtlog", "agent1", dep.roster)
    hs, stage = orch.sign(AgentStage(TOKEN, "h1", b"sealed", 0, SEG), "agent1", epoch=3)
    up.record("in", stage, "accepted")
    index = read_log(tmp_path / "agent1.gtlog")[-1].index
    _, ready = agent.sign(AgentReady(TOKEN), "orch", epoch=3, parent=hs.id)
    up.record("out", ready, "sent")
    up.close()
    name, diff = redrive(tmp_path / "agent1.gtlog")
    assert diff is not None and diff.record == index and "answers refusal agent-stage, the log shows agent.ready" in diff.message


def test_a_holder_return_after_its_revoke_is_found(tmp_path: Path) -> None:
    dep = make_deployment(tmp_path / "keys", holders=1)
    orch, h1 = MessageSigner(dep.orchestrator), MessageSigner(dep.holders[0])
    path = tmp_path / "h1.gtlog"
    rec = Recorder(path, "h1", dep.roster)
    now = time.time()
    _, g = orch.sign(TokenGrant(TOKEN, "run", "h1", 0, "travel", now + 10, b"sealed", {}), "h1", epoch=1)
    rec.record("in", g, "accepted")
    _, a = h1.sign(TokenAck(TOKEN), "orch", epoch=1)
    rec.record("out", a, "sent")
    _, rv = orch.sign(TokenRevoke(TOKEN, "lease expired"), "h1", epoch=1)
    rec.record("in", rv, "accepted")
    _, r = h1.sign(TokenReturn(TOKEN, 0, 1, 10, b"d" * 32, bytes(32)), "orch", epoch=1)
    rec.record("out", r, "sent")
    index = read_log(path)[-1].index
    rec.close()
    name, diff = redrive(path)
    assert diff is not None and diff.record == index
    assert "token.return epoch 1: the state machine returns nothing" in diff.message
