"""The simulator over many seeds: every invariant holds, runs are deterministic, failures reproduce in one line."""

from __future__ import annotations

import json
import os

import pytest
from broken_machines import UnverifiedHop
from click.testing import CliRunner

from gtbus.cli.main import main
from gtbus.cli.sim import report_failure
from gtbus.testing.sim import Machines, run_seed, run_seeds, shrink
from gtbus.testing.sim.config import SimConfig
from gtbus.testing.sim.hostile import BEHAVIOURS

#: Seeds `make test` runs (GTBUS_SIM_SEEDS to change it, e.g. for a soak), split over one GPU and fleets of 2 and 3.
SEEDS = int(os.environ.get("GTBUS_SIM_SEEDS", "3000"))
FLEETS = (1, 2, 3)


@pytest.mark.parametrize("gpus", FLEETS)
def test_many_seeds_keep_every_invariant(gpus: int) -> None:
    count = SEEDS // len(FLEETS)
    s = run_seeds(count, first=FLEETS.index(gpus) * count, gpus=gpus)
    print(json.dumps({k: v for k, v in s.to_json().items() if k != "failing"}))
    assert not s.failures, "\n".join(f"{r.repro}: {r.violations[0]}\n  " + "\n  ".join(r.trace[-15:]) for r in s.failures[:3])
    assert s.seeds == count and s.finished + sum(s.stopped.values()) == count
    # The faults are real: hops were lost every way there is, and orchestrators resumed.
    assert {"trained", "revoked", "declined", "rejected", "undelivered", "rolled-back"} <= set(s.outcomes)
    assert s.modes == {"travel", "ship"}
    assert s.restarts > 0


def test_a_seed_replays_event_for_event() -> None:
    for seed in (3, 77, 1234):
        a, b = run_seed(seed), run_seed(seed)
        assert (a.hops, a.trained, a.steps, a.sim_time, a.outcomes) == (b.hops, b.trained, b.steps, b.sim_time, b.outcomes)


@pytest.mark.parametrize("gpus", FLEETS)
def test_without_faults_every_chunk_trains_once(gpus: int) -> None:
    for seed in range(50):
        r = run_seed(seed, faults=False, hostile=False, gpus=gpus)
        assert r.ok and r.finished
        assert r.trained == r.config.total_hops == r.hops == sum(r.lane_hops)


def test_a_fleet_travels_at_once_and_finishes_sooner() -> None:
    """Without faults, every GPU of a fleet does hops, and the same deployment ends sooner in simulated time."""
    cfg = SimConfig(holders=["h1", "h2", "h3", "h4"], remote=[], tokens={h: 192 for h in ("h1", "h2", "h3", "h4")}, rounds=2, faults=False)
    one = run_seed(5, config=cfg)
    for gpus in (2, 3):
        cfg.gpus = gpus
        r = run_seed(5, config=cfg)
        assert r.ok and r.finished and r.trained == one.trained == 24, (r.violations, r.trained)
        assert all(n > 0 for n in r.lane_hops) and len(r.lane_hops) == gpus
        assert r.sim_time < one.sim_time, (r.sim_time, one.sim_time)


@pytest.mark.parametrize("gpus", [1, 2])
@pytest.mark.parametrize("behaviour", sorted(BEHAVIOURS))
def test_a_hostile_holder_loses_only_its_own_hops(behaviour: str, gpus: int) -> None:
    cfg = SimConfig(holders=["h1", "h2", "h3"], remote=["h3"], tokens={"h1": 128, "h2": 192, "h3": 128}, rounds=2, faults=False,
                    hostile={"h2": behaviour}, gpus=gpus, merge_every=1)
    r = run_seed(11, config=cfg)
    assert r.ok and r.finished, (r.violations, r.trace)
    honest = 2 * (2 + 2)  # h1 and h3: two chunks each, two rounds
    assert r.trained >= honest


@pytest.mark.parametrize("behaviour", sorted(BEHAVIOURS))
def test_a_hostile_holder_in_ship_mode_loses_only_its_own_hops(behaviour: str) -> None:
    cfg = SimConfig(holders=["h1", "h2", "h3"], remote=[], tokens={"h1": 128, "h2": 192, "h3": 128}, rounds=2, mode="ship",
                    faults=False, hostile={"h2": behaviour})
    r = run_seed(13, config=cfg)
    assert r.ok and r.finished, (r.violations, r.trace)
    assert r.trained >= 2 * (2 + 2)


@pytest.mark.parametrize("behaviour", sorted(BEHAVIOURS))
def test_a_hostile_remote_holder_loses_only_its_own_hops(behaviour: str) -> None:
    cfg = SimConfig(holders=["h1", "h2"], remote=["h2"], tokens={"h1": 128, "h2": 192}, rounds=1, faults=False, hostile={"h2": behaviour})
    r = run_seed(12, config=cfg)
    assert r.ok and r.finished, (r.violations, r.trace)
    assert r.trained >= 2


def test_remote_holders_behind_one_agent_take_turns_on_a_fleet() -> None:
    """The agent stages one hop at a time: two lanes through it would revoke each other's hops (5 of 24
    were, before the fleet offered a remote holder only while its agent is free)."""
    cfg = SimConfig(holders=["h1", "h2", "h3", "h4"], remote=["h3", "h4"], tokens={h: 192 for h in ("h1", "h2", "h3", "h4")}, rounds=2,
                    faults=False)
    one = run_seed(5, config=cfg)
    cfg.gpus = 2
    two = run_seed(5, config=cfg)
    assert two.ok and two.finished and two.outcomes == {"trained": 24} == one.outcomes, two.outcomes
    assert two.sim_time < one.sim_time


def test_fleets_survive_failing_gpus() -> None:
    """Over seeds, GPUs fail: hops in flight are aborted and put back, runs go on with the other lanes,
    or stop with the named reason when none is left; no invariant breaks either way."""
    results = [run_seed(seed, gpus=2) for seed in range(300)]
    assert all(r.ok for r in results), next(r for r in results if not r.ok).violations
    assert any(r.finished and r.requeued for r in results)  # a retired replica's training, done again
    assert any(r.stopped and r.stopped.startswith("every GPU lane failed") for r in results)
    assert any(r.outcomes.get("aborted") for r in results)


def test_cli_json_totals() -> None:
    out = CliRunner().invoke(main, ["sim", "--seeds", "40", "--first", "100", "--json"])
    assert out.exit_code == 0, out.output
    d = json.loads(out.output)
    assert d["seeds"] == 40 and d["violations"] == 0 and d["hops"] > 0 and d["hops_per_s"] > 0
    p = d["prepared_hops"]
    assert 0 < p["used"] <= p["made"] < d["hops"] and p["discarded"] <= p["made"] - p["used"]


def test_a_failing_seed_prints_its_repro_line_and_trace(capsys: pytest.CaptureFixture[str]) -> None:
    broken = Machines(hop=UnverifiedHop)
    r = next(r for r in (run_seed(seed, machines=broken) for seed in range(200)) if not r.ok)
    small = shrink(r, machines=broken)
    report_failure(r, small)
    err = capsys.readouterr().err
    assert err.startswith(f"FAIL gtbus sim --seed {r.seed}\n")
    assert "shrunk to " in err and f"gtbus sim --seed {r.seed} --faults " in err
    assert "model-changed-without-training" in err and "fault: model tampered" in err and "last " in err


def test_shrinking_keeps_the_faults_that_matter_and_replays() -> None:
    broken = Machines(hop=UnverifiedHop)
    r = next(r for r in (run_seed(seed, machines=broken) for seed in range(200)) if not r.ok)
    small = shrink(r, machines=broken)
    kept = small.kept
    assert kept is not None and small.repro == f"gtbus sim --seed {r.seed} --faults {','.join(map(str, kept))}"
    assert len(kept) < len(r.faults)
    assert any(small.faults[i].startswith("tamper") for i in kept)  # the model was changed in the hop
    again = run_seed(r.seed, machines=broken, keep_faults=kept)
    assert [v.name for v in again.violations] == ["model-changed-without-training"]
    assert again.trace == small.trace


def test_cli_one_seed_and_bad_options() -> None:
    out = CliRunner().invoke(main, ["sim", "--seed", "7"])
    assert out.exit_code == 0 and out.output.startswith("seed 7: ")
    bad = CliRunner().invoke(main, ["sim", "--seed", "1", "--seeds", "2"])
    assert bad.exit_code != 0 and "not both" in bad.output
    neg = CliRunner().invoke(main, ["sim", "--seeds", "-3"])
    assert neg.exit_code != 0 and "Traceback" not in neg.output
    for args, says in ((["--seed", "1", "--faults", "x,2"], "not a list of fault numbers"), (["--seed", "1", "--faults", "-1"], "0 or more"),
                       (["--seeds", "2", "--faults", "1"], "--faults goes with --seed")):
        out = CliRunner().invoke(main, ["sim", *args])
        assert out.exit_code == 2 and says in out.output and "Traceback" not in out.output, out.output
    some = CliRunner().invoke(main, ["sim", "--seed", "7", "--faults", "none"])
    assert some.exit_code == 0 and "seed 7" in some.output
    for bad_gpus in ("0", "-1", "x", "65"):
        out = CliRunner().invoke(main, ["sim", "--seed", "7", "--gpus", bad_gpus])
        assert out.exit_code == 2 and "--gpus" in out.output and "Traceback" not in out.output, out.output


def test_cli_fleet() -> None:
    out = CliRunner().invoke(main, ["sim", "--seed", "7", "--gpus", "3"])
    assert out.exit_code == 0 and "3 GPUs merging every" in out.output, out.output
    one = json.loads(CliRunner().invoke(main, ["sim", "--seed", "7", "--gpus", "2", "--json"]).output)
    assert one["gpus"] == 2 and len(one["hops_per_gpu"]) == 2 and one["violations"] == []
    many = CliRunner().invoke(main, ["sim", "--seeds", "30", "--gpus", "2", "--json"])
    assert many.exit_code == 0 and json.loads(many.output)["gpus"] == 2 and json.loads(many.output)["violations"] == 0
