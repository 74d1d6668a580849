"""``--merge lockstep``: a fleet whose hops start in waves and train step by step together, real processes on 127.0.0.1.

The orchestrator runs with ``--gpus K --merge lockstep`` on the host backend and
plain holders as OS processes. What is checked comes from what the run left:
its message log (grants, hop records), summary, checkpoint and stderr.
Nothing waits on time: the holder that dies mid-wave is killed by its own
drill (after acking), and the test waits for the orchestrator's log.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy
import pytest
from test_fleet import CHUNK, assert_no_holder_on_two_lanes, every_chunk, holder_spans, model_keys
from travel_kit import Travel, trained_keys

from gtbus.nodes.run_checkpoint import lane_state

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "export"))  # the real export command's helper, not a copy
from export_kit import gtbus_here  # noqa: E402

pytestmark = pytest.mark.slow

LOCKSTEP = ("--merge", "lockstep")
SMALL = dict(holders=4, chunk_tokens=CHUNK, bytes_per_holder=16 * 1024, steps="6")


def waves(t: Travel) -> list[list[tuple[float, float, int]]]:
    """The hops' (grant sent, record published, epoch), grouped into waves: a wave's grants all precede its hops' records."""
    spans = sorted(s for ss in holder_spans(t).values() for s in ss)
    out: list[list[tuple[float, float, int]]] = []
    for s in spans:
        if out and s[0] < max(end for _, end, _ in out[-1]):
            out[-1].append(s)
        else:
            out.append([s])
    return out


def test_a_lockstep_fleet_trains_in_waves_every_chunk_once_and_its_replicas_end_identical(travel, tmp_path: Path) -> None:
    t: Travel = travel(**SMALL, gpus=2, extra_orchestrator_args=LOCKSTEP).start()
    summary = t.finish()
    hops = t.hops()

    keys = trained_keys(hops)
    assert sorted(keys) == every_chunk(t) and len(keys) == len(set(keys))
    assert summary["outcomes"] == {"trained": len(keys)} and summary["merge"] == "lockstep"
    assert all(n > 0 for n in summary["hops_per_gpu"])

    # Waves: no hop was granted while a hop of another wave was in flight, and the lanes did train side by side.
    ws = waves(t)
    assert any(len(w) == 2 for w in ws)
    for w, nxt in zip(ws, ws[1:]):
        assert max(end for _, end, _ in w) <= min(start for start, _, _ in nxt)
    assert_no_holder_on_two_lanes(t)
    # A merge after every wave that trained; and the fleet learned.
    assert summary["merges"] >= sum(1 for w in ws if len(w) == 2)
    assert summary["last_loss"] < summary["first_loss"]

    # The replicas are one model (every wave's members applied the same gradients; the wave-end merge copied it).
    state = t.checkpoint().trainer_state()
    a, b = lane_state(state, 0), lane_state(state, 1)
    assert all(numpy.array_equal(a[k], b[k]) for k in a if k.startswith("param")), "replicas differ after the run"
    assert "Traceback" not in t.stderr()
    res = t.replay_verify()
    assert res.returncode == 0, res.stdout + res.stderr
    # The model leaves with its provenance: every digest of the waves and their merges is explained.
    out = tmp_path / "model"
    r = gtbus_here("export", t.run_dir, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    r = gtbus_here("export", "--check", out, "--logs", t.logs, "--keys", t.dep.keys)
    assert r.returncode == 0 and "agrees with the logs" in r.stdout, r.stdout + r.stderr


def test_a_holder_that_dies_mid_wave_holds_its_mates_only_until_its_lease_and_nothing_is_trained_twice(travel) -> None:
    # h2 acks, then SIGKILLs itself (its own drill) while its wave mate trains or waits at a step's barrier
    # for it; the lease ends h2's hop, the mate's training goes on without it, and h2's chunks are skipped
    # once it has been away for --absent-timeout.
    t: Travel = travel(**SMALL, gpus=2, lease=2.0, holder_faults={"h2": "exit_mid_provision"},
                       extra_orchestrator_args=(*LOCKSTEP, "--absent-timeout", "2")).start()
    summary = t.finish()
    hops = t.hops()

    h2 = [h for h in hops if h["holder"] == "h2"]
    assert h2[0]["outcome"] == "revoked" and "lease expired" in h2[0]["detail"]
    assert not any(h["outcome"] == "trained" for h in h2)
    # Its wave mate trained only after h2's hop had ended (and left the wave): it waited at the first step's barrier.
    (wave,) = [w for w in waves(t) if any(e == h2[0]["epoch"] for *_, e in w)]
    h2_end = next(end for _, end, e in wave if e == h2[0]["epoch"])
    assert len(wave) == 2 and all(end >= h2_end for _, end, _ in wave)
    # Every other chunk is in the model once; h2's are skipped, none trained.
    keys = model_keys(hops)
    assert sorted(keys) == [k for k in every_chunk(t) if k[1] != "h2"] and len(keys) == len(set(keys))
    assert all(s[1] == "h2" for s in summary["skipped"]) and summary["skipped"]
    assert summary["lanes_failed"] == [] and summary["last_loss"] < summary["first_loss"]
    assert_no_holder_on_two_lanes(t)
    assert "Traceback" not in t.stderr()
