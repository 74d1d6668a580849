"""Manifests of runs that did not go straight: a fleet with merges, a rollback that discarded training, a resume.

Each is a real run (processes, sockets, files); the manifest must list exactly
the hops in the final model, explain every model digest, and pass
``gtbus export --check`` against the run's logs.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from travel_kit import Travel, process_state

from gtbus.cli.main import main
from gtbus.provenance.document import read_document
from gtbus.provenance.manifest import MANIFEST_FILE, Manifest, check_consistency, parse_manifest

pytestmark = pytest.mark.slow


def manifest_of(t: Travel) -> Manifest:
    p = t.run_dir / "provenance" / MANIFEST_FILE
    return parse_manifest(read_document(p), str(p))


def export_and_check(t: Travel, out: Path) -> str:
    runner = CliRunner()
    r = runner.invoke(main, ["export", str(t.run_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["export", "--check", str(out), "--logs", str(t.logs), "--keys", str(t.dep.keys)])
    assert r.exit_code == 0, r.output
    return r.output


def in_model(hops: list[dict[str, Any]]) -> list[tuple[int, str, int]]:
    """(round, holder, chunk) of every hop whose training is in the final model."""
    return [(h["round"], h["holder"], h["chunk"]) for h in hops if h["outcome"] == "trained" and not h["discarded"]]


def test_a_fleet_lists_its_lanes_and_merges_and_every_digest_is_explained(travel: Any, tmp_path: Path) -> None:
    t: Travel = travel(holders=2, gpus=2, chunk_tokens=16384, steps="4", bytes_per_holder=48 * 1024).start()
    t.finish()
    m = manifest_of(t)
    assert sorted((h.round, h.holder, h.chunk) for h in m.hops) == sorted(in_model(t.hops()))
    assert {h.lane for h in m.hops} == {0, 1}
    assert m.merges and all(r.epochs for r in m.merges)
    assert {e for r in m.merges for e in r.epochs} == {h.epoch for h in m.hops}  # every hop merged in once
    assert m.final_model == m.merges[-1].model == t.checkpoint_model_hash()
    assert check_consistency(m) == []
    assert m.settings["gpus"] == 2
    assert "agrees with the logs" in export_and_check(t, tmp_path / "model")


def test_training_thrown_away_by_a_rollback_is_listed_as_discarded_not_trained(travel: Any, tmp_path: Path) -> None:
    # Hop 1 trains but is not checkpointed (every 3rd hop); the model is tampered with
    # during hop 2, so the run goes back to the initial model and hop 1's chunk is trained again.
    t: Travel = travel(holders=2, chunk_tokens=16384, steps="4", bytes_per_holder=32 * 1024, checkpoint_every=3,
                    orchestrator_fault="tamper-model-at-epoch=2").start()
    t.finish()
    hops = {h["epoch"]: h for h in t.hops()}
    assert hops[1]["outcome"] == "trained" and hops[1]["discarded"] and hops[2]["outcome"] == "rolled-back"
    m = manifest_of(t)
    assert [(d[0], d[1], d[2]) for d in m.discarded] == [(1, hops[1]["holder"], hops[1]["chunk"])]
    assert 1 not in {h.epoch for h in m.hops}
    assert sorted((h.round, h.holder, h.chunk) for h in m.hops) == sorted(in_model(t.hops()))
    assert m.hops[0].model_before == m.initial_model  # started again from the model before hop 1
    assert check_consistency(m) == []
    assert "agrees with the logs" in export_and_check(t, tmp_path / "model")


def test_a_resumed_run_lists_every_hop_of_its_model_and_names_the_epochs_the_crash_lost(travel: Any, tmp_path: Path) -> None:
    t: Travel = travel(holders=2, chunk_tokens=32768, steps="4", holder_faults={"h2": "stop_after_ack"}).start()
    t.wait_for("h2 stopped after its ack", lambda: process_state(t.holder("h2").pid) == "T")
    t.wait_message("h2's ack", lambda m: m.dir == "out" and m.type == "token.ack", node="h2")
    assert t.kill(t.orchestrator) == -signal.SIGKILL
    for name in t.holder_names:
        t.kill(t.holder(name))
    t.dep.run.holder_faults.clear()
    t.start_orchestrator(resume=True)
    for name in t.holder_names:
        t.restart_holder(name)
    t.finish()
    m = manifest_of(t)
    assert sorted((h.round, h.holder, h.chunk) for h in m.hops) == [(0, "h1", 0), (0, "h1", 1), (0, "h2", 0), (0, "h2", 1)]
    assert m.hops[0].epoch == 1  # trained by the first process, kept through the checkpoint
    (checkpoint_epoch, last_issued), = m.lost
    assert checkpoint_epoch == 1 and last_issued >= 2 and all(h.epoch > last_issued for h in m.hops[1:])
    assert check_consistency(m) == []
    assert "agrees with the logs" in export_and_check(t, tmp_path / "model")
    # Each holder's receipt from the second process covers its hops of both lifetimes.
    for name in t.holder_names:
        doc = read_document(t.run_dir / "receipts" / name / f"{m.run_id}.json")
        assert sorted(h["chunk"] for h in doc.body["hops"]) == [0, 1]
