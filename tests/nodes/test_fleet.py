"""A fleet: K GPU tokens travelling at once in one orchestrator, real processes on 127.0.0.1 (host backend).

Each test runs the orchestrator with ``--gpus K`` and plain holders as OS
processes, and checks what the issue asks of a fleet from what the run left:
the orchestrator's message log (grants, hop records), its summary and its
checkpoint. Nothing waits on time: the kill in the resume test waits for a
hop record in the log.
"""

from __future__ import annotations

import signal
from collections import defaultdict
from typing import Any

import pytest
from travel_kit import Travel, trained_keys

from gtbus.training.shards import Dataset

pytestmark = pytest.mark.slow

CHUNK = 8192
SMALL = dict(holders=3, chunk_tokens=CHUNK, bytes_per_holder=32 * 1024, steps="10")


def every_chunk(t: Travel, rounds: int = 1) -> list[tuple[int, str, int]]:
    """(round, holder, chunk) of every chunk the run's holders bring, for ``rounds`` rounds."""
    return sorted(
        (r, name, i)
        for r in range(rounds)
        for name, shard in zip(t.holder_names, t.dep.shards)
        for i, _ in Dataset([shard]).chunks(CHUNK)
    )


def model_keys(hops: list[dict[str, Any]]) -> list[tuple[int, str, int]]:
    """(round, holder, chunk) of every trained hop whose training is in the model (not discarded with its replica)."""
    return [(h["round"], h["holder"], h["chunk"]) for h in hops if h["outcome"] == "trained" and not h["discarded"]]


def assert_requeued_and_trained_again(hops: list[dict[str, Any]], lane: int, at: int) -> list[dict[str, Any]]:
    """The hops lane ``lane`` trained before epoch ``at`` were discarded (the lane's replica went back to the last
    merge) and each chunk was trained again later, in its round; every chunk is in the model once. The discarded ones."""
    thrown = [h for h in hops if h["discarded"]]
    assert thrown and all(h["lane"] == lane and h["epoch"] < at and h["outcome"] == "trained" for h in thrown), thrown
    assert all("training discarded" in h["detail"] for h in thrown)
    kept = {(h["round"], h["holder"], h["chunk"]): h for h in hops if h["outcome"] == "trained" and not h["discarded"]}
    for h in thrown:
        again = kept[(h["round"], h["holder"], h["chunk"])]
        assert again["epoch"] > at
    return thrown


def holder_spans(t: Travel) -> dict[str, list[tuple[float, float, int]]]:
    """Per holder, (grant sent, hop record published, epoch) of each of its hops, from the orchestrator's log."""
    msgs = t.messages()
    ended = {m.epoch: m.t for m in msgs if m.dir == "out" and m.type == "hop.record"}
    spans: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for m in msgs:
        if m.dir == "out" and m.type == "token.grant":
            spans[m.body["holder"]].append((m.t, ended[m.epoch], m.epoch))
    return spans


def assert_no_holder_on_two_lanes(t: Travel) -> None:
    for holder, spans in holder_spans(t).items():
        spans.sort()
        for (_, end, e1), (start, _, e2) in zip(spans, spans[1:]):
            assert end <= start, f"{holder}: hop {e2} was granted before hop {e1} ended"


def grant_token_ids(t: Travel) -> dict[int, str]:
    return {m.epoch: m.body["token_id"] for m in t.messages() if m.dir == "out" and m.type == "token.grant"}


@pytest.mark.parametrize("gpus, mode, merge_every", [(2, "travel", 0), (4, "travel", 0), (2, "ship", 1)])
def test_a_fleet_trains_every_chunk_once_on_every_lane(travel, gpus: int, mode: str, merge_every: int) -> None:
    # A holder is on one lane at a time: K lanes need K holders to be busy at once.
    t: Travel = travel(**{**SMALL, "holders": max(3, gpus)}, gpus=gpus, mode=mode, merge_every=merge_every).start()
    summary = t.finish()
    hops = t.hops()

    # Every chunk of every holder trained exactly once in the round, nothing else happened.
    keys = trained_keys(hops)
    assert sorted(keys) == every_chunk(t) and len(keys) == len(set(keys))
    assert summary["outcomes"] == {"trained": len(keys)} and summary["skipped"] == []

    # The hops were spread over every lane, each lane its own token; epochs from one counter.
    assert summary["gpus"] == gpus
    assert sum(summary["hops_per_gpu"]) == len(hops) and all(n > 0 for n in summary["hops_per_gpu"])
    assert {h["lane"] for h in hops} == set(range(gpus))
    tokens = grant_token_ids(t)
    assert sorted(tokens) == list(range(1, len(hops) + 1))  # no epoch issued twice, none skipped
    assert {h["token_id"] for h in hops} == {f"gpu{k}" for k in range(gpus)}
    assert all(tokens[h["epoch"]] == h["token_id"] == f"gpu{h['lane']}" for h in hops)

    # A holder was on one lane at a time: its grant..record intervals never overlap.
    assert_no_holder_on_two_lanes(t)
    # ...and lanes did overlap: some hop was granted while another lane's was in flight.
    spans = sorted(s for ss in holder_spans(t).values() for s in ss)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))

    # The replicas were merged (every --merge-every trained hops, default --gpus; the hops still in
    # flight when a merge falls due end before it: at most merge_every + K - 1 hops a merge, so
    # --merge-every 1 at K = 2 merges every 2 hops at most), and the fleet learned.
    assert summary["merges"] >= -(-len(hops) // ((merge_every or gpus) + gpus - 1))
    assert summary["last_loss"] < summary["first_loss"]

    # Nothing was refused, and the logs verify offline.
    assert not any(m.verdict.startswith("rejected") for m in t.messages())
    # Holders busy on lanes, or a merge between hops, is not a wait for unreachable holders.
    assert "can be reached" not in t.stderr()
    res = t.replay_verify()
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_lane_whose_device_fails_is_retired_and_its_hop_done_by_another(travel) -> None:
    # Merged only at the round's end: the failed lane had trained one of the first two hops, unmerged.
    t: Travel = travel(**SMALL, gpus=2, merge_every=100, orchestrator_fault="fail-device-at-epoch=3").start()
    summary = t.finish()
    hops = t.hops()

    failed = summary["lanes_failed"]
    assert len(failed) == 1 and "injected device failure during hop 3" in failed[0]["reason"]
    dead = failed[0]["lane"]
    aborted = [h for h in hops if h["outcome"] == "aborted"]
    assert [(h["epoch"], h["lane"]) for h in aborted] == [(3, dead)]
    assert "goes back to the schedule" in aborted[0]["detail"]

    # What the retired replica trained is not in the model: those chunks went back into the round and
    # were trained again on the lane that serves, and the summary counts them.
    thrown = assert_requeued_and_trained_again(hops, dead, 3)
    assert failed[0]["trained_hops_requeued"] == len(thrown)
    assert "go back to the schedule" in t.stderr()

    # The run went on with the other lane: every chunk in the model exactly once (chunks x rounds), the
    # failed hop's chunk too (later, on the lane that serves), nothing after on the dead lane.
    keys = model_keys(hops)
    assert sorted(keys) == every_chunk(t) and len(keys) == len(set(keys)) == len(every_chunk(t))
    redo = next(h for h in hops if h["outcome"] == "trained" and (h["holder"], h["chunk"]) == (aborted[0]["holder"], aborted[0]["chunk"]))
    assert redo["lane"] != dead and redo["epoch"] > 3
    assert all(h["lane"] != dead for h in hops if h["epoch"] > 3 and h["outcome"] == "trained")
    assert_no_holder_on_two_lanes(t)
    res = t.replay_verify()
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_lane_whose_model_changed_mid_hop_is_rolled_back_and_the_fleet_goes_on(travel) -> None:
    # Merged only at the round's end: hop 5's lane had trained one of the first two hops (at least), unmerged.
    t: Travel = travel(**SMALL, gpus=2, merge_every=100, orchestrator_fault="tamper-model-at-epoch=5").start()
    summary = t.finish()
    hops = t.hops()
    rolled = [h for h in hops if h["outcome"] == "rolled-back"]
    assert [h["epoch"] for h in rolled] == [5] and "restored the last checkpoint" in rolled[0]["detail"]
    # The replica went back to the last merge (here the initial model): what the lane trained since is
    # not in it, so those chunks went back into the round and were trained again.
    assert_requeued_and_trained_again(hops, rolled[0]["lane"], 5)
    # The rolled-back chunk is retried (on either lane) and every chunk is in the model once; no lane was retired.
    keys = model_keys(hops)
    assert sorted(keys) == every_chunk(t) and len(keys) == len(set(keys)) == len(every_chunk(t))
    assert summary["lanes_failed"] == [] and summary["last_loss"] < summary["first_loss"]
    assert "can be reached" not in t.stderr()


def test_when_every_lane_failed_the_run_stops_with_the_reason(travel) -> None:
    t: Travel = travel(**SMALL, gpus=1, orchestrator_fault="fail-device-at-epoch=2").start()
    assert t.orchestrator.wait(timeout=90) != 0
    err = t.stderr()
    assert "every GPU lane failed" in err and "injected device failure during hop 2" in err
    assert "Traceback" not in err
    # The trained hop before it is in the checkpoint; the failed one is not trained.
    assert trained_keys(t.hops()) == [(0, "h1", 0)]


def test_a_fleet_killed_between_merges_resumes_from_the_last_merge(travel) -> None:
    t: Travel = travel(**SMALL, gpus=2, rounds=2).start()
    t.wait_for("a checkpoint with 4 hops (two merges)", lambda: t.dep.run.run_dir.joinpath("checkpoints", "orch.npz").exists() and len(t.hops()) >= 4)
    assert t.kill(t.orchestrator) == -signal.SIGKILL
    issued_before = len(grant_token_ids(t))
    saved = t.checkpoint()
    assert saved.schedule is not None and saved.schedule["lanes"] == 2
    assert any(k.startswith("fleet.lane1/") for k in saved.arrays)

    for name in t.holder_names:
        t.kill(t.holder(name))
    t.start_orchestrator(resume=True)
    for name in t.holder_names:
        t.restart_holder(name)
    summary = t.finish()

    # No epoch was issued twice across both lifetimes (the log holds both).
    grants = [m.epoch for m in t.messages() if m.dir == "out" and m.type == "token.grant"]
    assert len(grants) == len(set(grants)) and min(grants[issued_before:]) > max(grants[:issued_before])
    # The resumed fleet went on from the checkpoint: every chunk of both rounds trained once, and in the model.
    hops = t.hops()
    keys = trained_keys(hops)
    assert sorted(keys) == every_chunk(t, rounds=2) and len(keys) == len(set(keys))
    assert sorted(model_keys(hops)) == sorted(keys)
    assert summary["gpus"] == 2 and summary["skipped"] == []
    assert summary["last_loss"] < summary["first_loss"]


def test_one_gpu_rolled_back_between_checkpoints_trains_the_hops_since_again(travel) -> None:
    # --checkpoint-every 4: hop 3's rollback restores the initial model, without hops 1 and 2's training.
    t: Travel = travel(**SMALL, gpus=1, checkpoint_every=4, orchestrator_fault="tamper-model-at-epoch=3").start()
    summary = t.finish()
    hops = t.hops()
    assert [h["epoch"] for h in hops if h["outcome"] == "rolled-back"] == [3]
    thrown = assert_requeued_and_trained_again(hops, 0, 3)
    assert sorted(h["epoch"] for h in thrown) == [1, 2]
    keys = model_keys(hops)
    assert sorted(keys) == every_chunk(t) and len(keys) == len(every_chunk(t))
    assert summary["gpus"] == 1 and summary["last_loss"] < summary["first_loss"]
