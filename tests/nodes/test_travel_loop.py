"""The whole travel loop with real processes: orchestrator and holders on 127.0.0.1."""

from __future__ import annotations

import pytest
from travel_kit import Travel, trained_keys

from gtbus.bench.device import holder_phases
from gtbus.nodes.hop_phases import ORCHESTRATOR_PHASES, RETURN_LINE_PHASES
from gtbus.training.shards import Dataset

pytestmark = pytest.mark.slow


def test_every_hop_trains_loss_falls_logs_verify(travel) -> None:
    t: Travel = travel(holders=3, chunk_tokens=16384, bytes_per_holder=64 * 1024).start()
    summary = t.finish()
    hops = t.hops()

    # Every chunk of every holder travelled once, in round-robin order, and trained.
    chunk_bytes = {
        (name, i): int(tokens.shape[0]) * 2
        for name, shard in zip(t.holder_names, t.dep.shards)
        for i, tokens in Dataset([shard]).chunks(16384)
    }
    assert len(chunk_bytes) == 12
    assert [h["outcome"] for h in hops] == ["trained"] * len(chunk_bytes)
    assert summary["hops"] == summary["hops_trained"] == len(chunk_bytes)
    assert summary["outcomes"] == {"trained": len(chunk_bytes)}
    assert summary["skipped"] == []
    order = [(h["holder"], h["chunk"]) for h in hops]
    assert order == [(n, c) for c in range(4) for n in ("h1", "h2", "h3")]
    assert sorted(trained_keys(hops)) == sorted((0, n, c) for n, c in chunk_bytes)

    # Bytes: each hop carried exactly its chunk, and the total is their sum.
    for h in hops:
        assert h["nbytes"] == chunk_bytes[(h["holder"], h["chunk"])]
    assert summary["bytes_provisioned"] == sum(chunk_bytes.values())

    # The model learned: held-out loss on the last chunk is below that on the first.
    assert summary["last_loss"] < summary["first_loss"]

    # Epochs are 1..n, one grant per hop, and each hop's model measurement moved
    # (training changed the model between consecutive grants).
    grants = t.grants()
    assert [g.epoch for g in grants] == [h["epoch"] for h in hops] == list(range(1, len(hops) + 1))
    assert len({g.model_hash for g in grants}) == len(grants)
    assert summary["last_epoch"] == len(hops)

    # Each hop had its own staging. (That a hop's staging is withdrawn when it ends is
    # checked while the orchestrator still runs: test_faults, test_old_staging_...; after
    # the run its device and broker are gone, so a probe here could not fail.)
    assert len({g.handle for g in grants}) == len(grants)

    # The recorded messages verify offline: signatures, sequences, chains.
    res = t.replay_verify()
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("ok ") == 4  # orchestrator + 3 holders

    # Each hop after the first was prepared while the one before ran (gtbus.nodes.hop_prepare): its
    # params went to its holder in a token.prepare before the grant carrying the same sealed params,
    # and the holder wrote through what it had prepared. No guess was wrong in a run without faults.
    n = len(hops)
    assert summary["prepared_hops"] == {"made": n - 1, "used": n - 1, "discarded": 0}
    sent = t.messages()
    for i, m in enumerate(sent):
        if m.type == "token.grant" and m.epoch > 1:
            before = [p for p in sent[:i] if p.type == "token.prepare" and p.recipient == m.body["holder"]]
            assert before and before[-1].body["sealed_params"] == m.body["sealed_params"], m.epoch
    # Each holder wrote its later hops through what it prepared. (Its first hop's preparation may reach it
    # while it still sets up after registering: then it waits there, and a grant that comes first maps itself.)
    for name in t.holder_names:
        lines = [x for x in t.stderr(name).splitlines() if ": wrote " in x]
        assert len(lines) == 4 and all(x.endswith("params and staging were prepared ahead") for x in lines[1:]), lines

    # Holders wrote what they said: every return names the granted chunk.
    returns = [m for m in t.messages() if m.type == "token.return"]
    assert len(returns) == len(hops) and all(m.verdict == "accepted" for m in returns)
    assert not any(m.verdict.startswith("rejected") for m in t.messages())

    # Where each hop's time went: every orchestrator phase of a trained hop is marked,
    # in the hop's order (the checkpoint holding a hop is written before that hop's
    # checkpoint and publish marks, so those two are checked on the hops before the last),
    # and each holder's hop line gives its own phases.
    for h in hops:
        marks = h["phases"]
        before_return = [marks[n] for n in ORCHESTRATOR_PHASES[:7]]
        after_return = [marks[n] for n in ("ack_received", "return_received", "open", "remeasure", "train", "scrub")]
        assert before_return == sorted(before_return) and after_return == sorted(after_return), marks
        assert marks["grant_sent"] <= marks["ack_received"]
    assert all({"checkpoint", "publish"} <= set(h["phases"]) for h in hops[:-1])
    for name in t.holder_names:
        lines = holder_phases(t.stderr(name))
        assert sorted(lines) == sorted(h["epoch"] for h in hops if h["holder"] == name)
        assert all([n for n, _ in phases] == list(RETURN_LINE_PHASES) for phases in lines.values()), lines
