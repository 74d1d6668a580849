"""``gtbus bench fleet``: K GPU tokens travelling at once vs one, in one invocation.

Every run is a real deployment started by the CLI
(:class:`~gtbus.nodes.launcher.LocalDeployment`: the orchestrator with
``--gpus K --merge-every N --merge POLICY`` and one holder process per holder, CURVE ZeroMQ on
loopback), on the same shards (made by ``gtbus data build``), the same chunks,
one round, the same fixed number of optimizer steps per hop: so every run
trains the same number of tokens, and only K (and the merges it brings)
differs. K = 1 is the baseline, measured in the same invocation.

What is measured, per run (definitions as the result file prints them):

* **training window**: from the first hop's begin (its grant being prepared)
  to the last hop's record, on the bench's clock: each hop line the
  orchestrator prints is timestamped on arrival, and the hop's own phase marks
  (kept in the checkpoint) say how long before its record it began. Process
  start, imports, model build and registration are before it; the run's end
  (last checkpoint, shutdown) after it. To the window the run's whole merge time
  is added (the merges between hops are inside it already; the end's merge is
  not: counting all of them again can only lower the fleet's rate).
* **aggregate tokens/s** = tokens trained / training window, tokens trained =
  trained hops x steps per hop x tokens a step (the trainer's own count);
  **scaling** = that rate / the one-GPU run's.
* **provisioning GB/s**: hop bytes / the sum over hops of their transfer time
  (grant to plaintext in the device buffer), and hop bytes / training window.
* **held-out loss**: the run's final model (its last checkpoint: with K > 1,
  the replicas merged) scored by the bench on a shard no holder has; and the
  relative difference to the one-GPU run's. The summary's last-hop numbers are
  shown beside it.
* **merge policies** (``--compare-merge``, at the largest K): the held-out
  loss each policy's final model reached and the loss dropped per second of
  its window; all runs train the same tokens, so this is the issue's "loss
  reached per wall-clock second" at a fixed token count.
"""

from __future__ import annotations

import math
import os
import resource
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy

from gtbus.bench.report import Result, Table, machine_info
from gtbus.bench.travel import write_holder_shards
from gtbus.bench.travel_plan import MIB
from gtbus.errors import ConfigError
from gtbus.protocol.admission import TOKEN_BYTES
from gtbus.training.merge import DEFAULT_MERGE, merge_policy

#: The issue's goals: aggregate tokens/s with K GPUs over one GPU's, and the loss after the same tokens.
SCALING_GOALS = {2: 1.85, 4: 3.5}
LOSS_GOAL_PERCENT = 2.0

_HOP_LINE = re.compile(r"\bhop\s+(\d+)\s")


@dataclass(frozen=True)
class FleetWork:
    """What every run of one bench trains: workload, backend, pin, shards and the hop sizes."""

    trainer: str
    backend: str
    pin: str
    shards: tuple[Path, ...]
    chunk_tokens: int
    steps_per_hop: int

    @property
    def holders(self) -> int:
        """Holders of every run (one shard each)."""
        return len(self.shards)


class HeldOut:
    """The bench's own scorer: one trainer on the backend, a shard no holder has, and the tokens a step counts."""

    def __init__(self, trainer: str, backend: str, shard: Path, tokens: int) -> None:
        from gtbus.gpu.backends import make_device
        from gtbus.training.shards import read_shard
        from gtbus.training.workloads import make_trainer

        xp = make_device(backend).array_module
        self.trainer = make_trainer(trainer)
        self.trainer.load(xp)
        self.tokens = xp.asarray(numpy.ascontiguousarray(read_shard(shard)[:tokens]))
        self.initial_loss = self.trainer.evaluate(self.tokens)
        # One step on the held-out tokens gives the trainer's own count of tokens a step
        # (the model is replaced by each run's before it is scored again).
        report = self.trainer.train_on(self.tokens, 1)
        self.tokens_per_step = report.tokens_seen // report.steps

    def loss_of(self, checkpoint: Path) -> float:
        """The held-out loss of ``checkpoint``'s model (with a fleet: its first replica, the merged one)."""
        from gtbus.nodes.run_checkpoint import lane_state
        from gtbus.training.checkpoint import read_checkpoint

        self.trainer.load_state_dict(lane_state(read_checkpoint(checkpoint).trainer_state(), 0))
        return self.trainer.evaluate(self.tokens)


def run_fleet_once(run_dir: Path, *, gpus: int, merge_every: int, work: FleetWork, held: HeldOut, merge: str = DEFAULT_MERGE) -> dict[str, Any]:
    """One deployment with ``gpus`` lanes: its summary's fleet numbers, the training window and the held-out loss."""
    from gtbus.nodes.launcher import LocalDeployment, LocalRun
    from gtbus.training.checkpoint import read_checkpoint

    hops_expected = sum(-(-_shard_tokens(s) // work.chunk_tokens) for s in work.shards)
    run = LocalRun(
        run_dir=run_dir, holders=work.holders, mode="travel", rounds=1, chunk_tokens=work.chunk_tokens, steps=str(work.steps_per_hop),
        lease=60.0, backend=work.backend, data=list(work.shards), trainer=work.trainer, pin=work.pin,
        # Checkpoints only where the fleet writes them anyway (merges, the end): K = 1 pays no extra one per hop.
        checkpoint_every=hops_expected + 1, gpus=gpus, merge_every=merge_every, extra_orchestrator_args=("--merge", merge),
    )
    arrived: dict[int, float] = {}

    def on_line(line: str) -> None:
        m = _HOP_LINE.search(line)
        if m:
            arrived.setdefault(int(m.group(1)), time.perf_counter())

    cpu0 = _children_cpu_s()
    t0 = time.perf_counter()
    summary = LocalDeployment(run).run_to_end(on_line, timeout=120.0 + hops_expected * (10.0 + work.steps_per_hop * 0.5))
    wall = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu0
    checkpoint = Path(summary["checkpoint"])
    hops = read_checkpoint(checkpoint, state=False).hops
    # A hop began at its record's arrival minus its last phase mark (marks are seconds since the hop began).
    begins = [arrived[h["epoch"]] - max(h["phases"].values()) for h in hops if h.get("epoch") in arrived and h.get("phases")]
    if not begins:
        raise ConfigError(f"fleet bench: the run in {run_dir} printed no hop it recorded (logs in {run_dir})")
    first, last = min(begins), max(arrived.values())
    merge_s = float(summary.get("merge_s", 0.0))
    window = last - first + merge_s
    trained = [h for h in hops if h.get("outcome") == "trained"]
    tokens = len(trained) * work.steps_per_hop * held.tokens_per_step
    hop_time = sum(max(h["phases"].values()) for h in trained if h.get("phases"))
    return {
        "gpus": gpus,
        "merge_every": merge_every,
        "merge": merge,
        "merged_by": summary.get("merge"),
        "blas_threads": summary.get("blas_threads"),
        "hops_expected": hops_expected,
        "hops_trained": summary["hops_trained"],
        "outcomes": summary["outcomes"],
        "hops_per_gpu": summary.get("hops_per_gpu", [summary["hops"]]),
        "trained_per_gpu": summary.get("trained_per_gpu", [summary["hops_trained"]]),
        "lanes_failed": summary.get("lanes_failed", []),
        "merges": summary.get("merges", 0),
        "merge_s": merge_s,
        "tokens": tokens,
        "window_s": window,
        "startup_s": first - t0,
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens_per_s": tokens / window if window > 0 else 0.0,
        # Hop time summed over hops / window: how many tokens were out at once on average.
        "tokens_out_mean": hop_time / window if window > 0 else 0.0,
        "bytes": summary["bytes_provisioned"],
        "transfer_s": summary["transfer_s"],
        "train_s": summary["train_s"],
        "eval_s": summary["eval_s"],
        "epilogue_s": sum(h.get("epilogue_s", 0.0) for h in trained),
        "provision_gbps": summary["provision_gbps"],
        "provision_window_gbps": summary["bytes_provisioned"] / window / 1e9 if window > 0 else 0.0,
        "heldout_loss": held.loss_of(checkpoint),
        "last_hop_eval_before": summary["last_loss"],
        "last_hop_eval_after": summary["final_train_loss"],
    }


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's ended children (a deployment's processes, once it has stopped them)."""
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def _shard_tokens(shard: Path) -> int:
    from gtbus.training.shards import read_shard

    return int(read_shard(shard).shape[0])


def parse_gpus(text: str) -> list[int]:
    """``--gpus``: comma-separated lane counts above one (the one-GPU baseline is always run); sorted, without repeats."""
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--gpus {text!r}: comma-separated numbers of GPUs, like 2,4") from None
    if not counts or counts[0] < 2:
        raise ConfigError(f"--gpus {text!r}: each count must be 2 or more (the one-GPU baseline is run anyway)")
    return counts


def run_fleet_bench(
    out_dir: str | os.PathLike[str] | None = "bench/results",
    *,
    gpus: Sequence[int] = (2, 4),
    backend: str = "host",
    trainer: str = "bytelm",
    holders: int | None = None,
    chunk_tokens: int = 1 << 15,
    chunks_per_holder: int = 4,
    steps_per_hop: int = 8,
    merge_every: int = 0,
    compare_merge_every: Sequence[int] = (),
    merge: str = DEFAULT_MERGE,
    compare_merge: Sequence[str] = (),
    heldout_tokens: int = 1 << 16,
    repeats: int = 1,
    keep_runs: Path | None = None,
    say: Callable[[str], None] = print,
) -> Result:
    """The one-GPU run, a run per K of ``gpus`` (and one per value of ``compare_merge_every`` and per policy of ``compare_merge`` at the largest K), ``repeats`` times; write ``fleet-<backend>-<host>``.

    Repeats are interleaved (every configuration once, then again in reverse
    order...), so that load that comes and goes on the machine falls on all of
    them; the tables and goals take each configuration's medians.
    """
    from gtbus.nodes.launcher import measure_pin

    if not gpus or min(gpus) < 2:
        raise ConfigError("fleet bench: give GPU counts of 2 or more (the one-GPU baseline is run anyway)")
    holders = holders or max(gpus)
    if holders < max(gpus):
        raise ConfigError(f"fleet bench: {holders} holders cannot keep {max(gpus)} GPUs busy (a holder is on one GPU at a time); give --holders {max(gpus)} or more")
    for policy in (merge, *compare_merge):
        merge_policy(policy)  # a policy it does not know: a one-line ConfigError before anything runs
    for name, value in (("chunk tokens", chunk_tokens), ("chunks per holder", chunks_per_holder), ("steps per hop", steps_per_hop), ("repeats", repeats)):
        if value < 1:
            raise ConfigError(f"fleet bench: {name} must be positive, got {value}")
    machine = machine_info()
    res = Result(f"fleet-{backend}", f"Fleet: K GPU tokens at once vs one ({trainer}, {backend} backend)", machine)
    settings = {"gpus": list(gpus), "backend": backend, "trainer": trainer, "holders": holders, "chunk_tokens": chunk_tokens,
                "chunks_per_holder": chunks_per_holder, "steps_per_hop": steps_per_hop, "merge_every": merge_every,
                "compare_merge_every": list(compare_merge_every), "merge": merge, "compare_merge": list(compare_merge), "heldout_tokens": heldout_tokens, "repeats": repeats}
    say(f"fleet bench ({trainer}, {backend}): K = 1, {', '.join(map(str, gpus))}; {holders} holders x {chunks_per_holder} chunks of "
        f"{chunk_tokens:,} tokens, {steps_per_hop} steps a hop, {repeats} x each; {machine['usable_cores']} usable cores; load {machine['load_at_start']}")
    tmp = None if keep_runs else tempfile.mkdtemp(prefix="gtbus-bench-fleet-")
    base = Path(keep_runs or tmp)  # type: ignore[arg-type]
    runs: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    try:
        # One shard more than holders: the held-out one, which no holder has.
        shards = write_holder_shards(base / "data", holders + 1, max(chunk_tokens * chunks_per_holder, heldout_tokens))
        cut = _cut_shards(shards[:holders], chunk_tokens * chunks_per_holder, base / "data")
        pin = measure_pin(backend, trainer)
        held = HeldOut(trainer, backend, shards[-1], heldout_tokens)
        work = FleetWork(trainer, backend, pin, tuple(cut), chunk_tokens, steps_per_hop)
        plan = [(1, 0, merge)] + [(k, merge_every, merge) for k in gpus]
        plan += [(max(gpus), every, merge) for every in dict.fromkeys(compare_merge_every) if every != merge_every]
        plan += [(max(gpus), merge_every, policy) for policy in dict.fromkeys(compare_merge) if policy != merge]
        order = [cfg for rep in range(repeats) for cfg in (plan if rep % 2 == 0 else plan[::-1])]
        for i, (k, every, policy) in enumerate(order):
            say(f"  K = {k}" + (f", merge every {every or k} trained hops ({policy}) ..." if k > 1 else " (the baseline) ..."))
            run_dir = base / f"{i:02d}-gpus{k}-merge{every}-{policy.replace(':', '')}"
            r = run_fleet_once(run_dir, gpus=k, merge_every=every, work=work, held=held, merge=policy)
            if tmp is not None:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            say(f"    {r['hops_trained']} of {r['hops_expected']} hops trained, window {r['window_s']:.2f} s, {r['tokens_per_s']:,.0f} tokens/s, "
                f"{r['merges']} merges, held-out loss {r['heldout_loss']:.4f}")
            runs.append(r)
            _fill(res, out_dir, settings, held, runs, time.perf_counter() - t_start, done=False)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return _fill(res, out_dir, settings, held, runs, time.perf_counter() - t_start, done=True)


def _cut_shards(shards: Sequence[Path], tokens: int, out: Path) -> list[Path]:
    """Each holder's shard cut to exactly ``tokens`` (whole chunks), written as llm.c shards."""
    from gtbus.training.shards import read_shard, write_shard

    cut = []
    for i, s in enumerate(shards):
        path = out / f"holder{i:02d}-cut.bin"
        write_shard(path, read_shard(s)[:tokens])
        cut.append(path)
    return cut


def _rel(r: dict[str, Any], one: dict[str, Any]) -> float:
    """The run's held-out loss vs the one-GPU run's, in percent (positive: worse)."""
    return (r["heldout_loss"] - one["heldout_loss"]) / one["heldout_loss"] * 100 if one["heldout_loss"] else math.nan


def _every(r: dict[str, Any]) -> str:
    """The run's merge interval in trained hops as the tables show it ("-" for one GPU: nothing to merge; lockstep merges every wave)."""
    if r["gpus"] == 1:
        return "-"
    return "wave" if merge_policy(r["merge"]).gradients is not None else str(r["merge_every"] or r["gpus"])


def _drop_rate(c: dict[str, Any], held: HeldOut) -> float:
    """Held-out loss dropped per second of the configuration's training window."""
    return (held.initial_loss - c["heldout_loss"]) / c["window_s"] if c["window_s"] > 0 else 0.0


def _policy(r: dict[str, Any]) -> str:
    """The run's merge policy as the tables show it ("-" for one GPU)."""
    return "-" if r["gpus"] == 1 else r["merge"]


#: What a configuration's medians are taken of (the rest is its first run's).
_MEDIAN = ("window_s", "tokens_per_s", "tokens_out_mean", "merges", "merge_s", "provision_gbps", "provision_window_gbps", "heldout_loss")


def _configs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (GPUs, merge every, policy), in the order first run: its first run's values, the medians of :data:`_MEDIAN` over its runs."""
    groups: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["gpus"], r["merge_every"], r["merge"]), []).append(r)
    return [{**rs[0], **{k: statistics.median(r[k] for r in rs) for k in _MEDIAN}, "runs": len(rs),
             "hops_trained": min(r["hops_trained"] for r in rs)} for rs in groups.values()]


def _fill(res: Result, out_dir: str | os.PathLike[str] | None, settings: dict[str, Any], held: HeldOut, runs: list[dict[str, Any]],
          wall_total: float, *, done: bool) -> Result:
    """Header, tables, goals and data of the runs so far; written after every run, so a cut-off bench leaves what it measured."""
    res.tables.clear()
    res.goals.clear()
    res.finish()
    res.header = _header(res.machine, settings, held, wall_total)
    if not done:
        res.header.insert(0, f"PARTIAL: {len(runs)} runs so far (the bench writes its result after every run; this one did not finish).")
    configs = _configs(runs)
    one = configs[0]
    main = [c for c in configs[1:] if (c["merge_every"], c["merge"]) == (settings["merge_every"], settings["merge"])]
    reps = settings["repeats"]
    t = Table(f"Fleet vs one GPU: same shards, same chunks, same steps ({'median of ' + str(reps) + ' runs each' if reps > 1 else 'one run each'})",
              text_columns=3, columns=[
        "GPUs", "merge every", "merge", "runs", "hops trained (per GPU)", "tokens", "window s", "tokens/s", "scaling", "tokens out at once", "merges",
        "merge s", "GB/s (bytes / transfer)", "GB/s (bytes / window)", "held-out loss", "vs 1 GPU"])
    for c in configs:
        t.add(c["gpus"], _every(c), _policy(c), c["runs"], f"{c['hops_trained']} ({', '.join(map(str, c['trained_per_gpu']))})", f"{c['tokens']:,}",
              f"{c['window_s']:.2f}", f"{c['tokens_per_s']:,.0f}", f"{c['tokens_per_s'] / one['tokens_per_s']:.3f}" if one["tokens_per_s"] else "-",
              f"{c['tokens_out_mean']:.2f}", f"{c['merges']:g}", f"{c['merge_s']:.4f}", f"{c['provision_gbps']:.4g}", f"{c['provision_window_gbps']:.4g}",
              f"{c['heldout_loss']:.4f}", f"{_rel(c, one):+.2f} %" if c is not one else "-")
    t.notes.append("window = first hop's begin .. last hop's record, plus the run's whole merge time; tokens/s = tokens / window; "
                   "scaling = tokens/s / the one-GPU run's; tokens out at once = the hops' durations (begin .. record) summed / window; "
                   "numbers are each configuration's medians over its runs, hops per GPU those of its first run")
    t.notes.append(f"held-out loss: the run's final model (with K > 1 the replicas merged) scored on {held.tokens.shape[0]:,} tokens of a shard "
                   f"no holder has (untrained model: {held.initial_loss:.4f}); vs 1 GPU = (loss - one GPU's) / one GPU's")
    res.tables.append(t)
    d = Table("Every run: where the window goes (sums over hops; with K lanes, hops overlap)", text_columns=4, columns=[
        "run", "GPUs", "merge every", "merge", "startup s", "window s", "tokens/s", "transfer s", "training s", "evaluation s", "epilogue s", "merge s",
        "wall s", "CPU s", "held-out loss", "last hop eval before -> after"])
    for i, r in enumerate(runs):
        last = (f"{r['last_hop_eval_before']:.4f} -> {r['last_hop_eval_after']:.4f}"
                if r["last_hop_eval_before"] is not None and r["last_hop_eval_after"] is not None else "-")
        d.add(i, r["gpus"], _every(r), _policy(r), f"{r['startup_s']:.1f}", f"{r['window_s']:.2f}", f"{r['tokens_per_s']:,.0f}", f"{r['transfer_s']:.3f}",
              f"{r['train_s']:.2f}", f"{r['eval_s']:.2f}", f"{r['epilogue_s']:.3f}", f"{r['merge_s']:.4f}", f"{r['wall_s']:.1f}",
              f"{r['cpu_s']:.1f}", f"{r['heldout_loss']:.4f}", last)
    d.notes.append("in the order run; startup = process start .. first hop's begin (not in the window); wall = the whole deployment, "
                   "start to last process gone; CPU s = user + system CPU seconds of all the deployment's processes, start to end (startup included: what other load on the machine changes least); last hop = the summary's last trained hop, on its own chunk, before and after training it (one replica's view)")
    res.tables.append(d)
    if len({(c["merge_every"], c["merge"]) for c in configs[1:]}) > 1:
        p = Table("Merge policy at the largest K: loss per wall-clock second", text_columns=3, columns=[
            "GPUs", "merge every", "merge", "merges", "window s", "held-out loss", "vs 1 GPU", "loss drop / s", "vs 1 GPU's"])
        k = max(c["gpus"] for c in configs)
        for c in [one] + [c for c in configs if c["gpus"] == k]:
            p.add(c["gpus"], _every(c), _policy(c), f"{c['merges']:g}", f"{c['window_s']:.2f}", f"{c['heldout_loss']:.4f}",
                  f"{_rel(c, one):+.2f} %" if c is not one else "-", f"{_drop_rate(c, held):.4f}",
                  f"{_drop_rate(c, held) / _drop_rate(one, held):.3f}" if _drop_rate(one, held) > 0 else "-")
        p.notes.append("loss drop / s = (untrained model's held-out loss - the run's) / its window (medians): more is better; "
                       "vs 1 GPU's = that rate / the one-GPU run's. Every run trains the same tokens, so the rate weighs "
                       "both what a policy's merges cost in time and how far its model got")
        res.tables.append(p)
    for c in main:
        if one["tokens_per_s"] and c["gpus"] in SCALING_GOALS:
            res.goal(f"fleet_scaling_{c['gpus']}gpus", c["tokens_per_s"] / one["tokens_per_s"], SCALING_GOALS[c["gpus"]], "ratio")
    for c in main:
        res.goal(f"fleet_loss_vs_1gpu_{c['gpus']}gpus", _rel(c, one), LOSS_GOAL_PERCENT, "%", at_most=True)
    cores = res.machine["usable_cores"]
    one_cpu = ", ".join(f"{r['cpu_s']:.1f}" for r in runs if r["gpus"] == 1)
    for c in main:
        ratio = c["tokens_per_s"] / one["tokens_per_s"] if one["tokens_per_s"] else 0.0
        if settings["backend"] == "host" and ratio > cores:
            # K host lanes on N cores cannot run more than N times one lane: the baseline was slowed by what the fleet's runs were not.
            res.header.append(f"WARNING: K = {c['gpus']} ran at {ratio:.2f}x one GPU on {cores} cores, more than the cores allow: the one-GPU runs "
                              f"were slowed by something the fleet's were not (their CPU seconds: {one_cpu}); this ratio is not the lanes' scaling.")
    for r in runs:
        if r["hops_trained"] != r["hops_expected"]:
            res.header.append(f"WARNING: K = {r['gpus']} trained {r['hops_trained']} of {r['hops_expected']} hops ({r['outcomes']}); its tokens differ from the others'.")
    res.data = {"settings": settings, "heldout": {"tokens": int(held.tokens.shape[0]), "initial_loss": held.initial_loss,
                                                  "tokens_per_step": held.tokens_per_step}, "configs": configs, "runs": runs, "wall_s": wall_total}
    if out_dir is not None:
        md, js = res.write(out_dir)
        res.data["files"] = [str(md), str(js)]
    return res


def _header(machine: dict[str, Any], s: dict[str, Any], held: HeldOut, wall: float) -> list[str]:
    cores, kmax = machine["usable_cores"], max(s["gpus"])
    tokens = s["holders"] * s["chunks_per_holder"] * s["steps_per_hop"] * held.tokens_per_step
    lines = [
        "",
        f"Dataset: {s['holders']} holders x {s['chunks_per_holder']} chunks of {s['chunk_tokens']:,} tokens "
        f"({s['chunk_tokens'] * TOKEN_BYTES / MIB:.4g} MiB of hop bytes a chunk), llm.c shards by `gtbus data build` from the Python stdlib "
        f"sources split round-robin; one round; {s['steps_per_hop']} optimizer steps a hop ({held.tokens_per_step:,} tokens a step): "
        f"{tokens:,} tokens trained in every run, K = 1 and every K alike.",
        "",
        f"Every run is a real deployment started by the CLI (`gtbus orchestrator --gpus K --merge-every N --backend {s['backend']} "
        f"--trainer {s['trainer']}` and a `gtbus holder` process per holder, CURVE ZeroMQ on loopback, travel mode); merge every "
        f"{s['merge_every'] or 'K'} trained hops of the fleet, `--merge {s['merge']}` (in the orchestrator's process; "
        "average: the replicas' mean; sum: the last merged model plus every replica's update since it; delta:LR: plus LR x their mean update; "
        "lockstep: hops start in waves of up to K, the wave's gradients averaged before every optimizer step, merged after every wave).",
        "",
        "Aggregate tokens/s = tokens trained / training window. Training window = from the first hop's begin to the last hop's record "
        "(each hop line timestamped on arrival at the bench, less that hop's own phase marks, which say how long before its record it began), "
        "plus the run's whole merge time (merges between hops are inside the window already; the end's merge is not: counting all again "
        "can only lower the fleet's rate). Not counted: process start, model build, registration (startup s), and the run's end. "
        "Counted: grants, transfers, training, evaluations, scrubs, merges, checkpoints at merges, idle lanes.",
        "",
    ]
    if s["backend"] == "host":
        lines.append(
            f"This machine: {cores} usable cores shared by K up to {kmax} emulated devices (the lanes of one orchestrator process), "
            f"the {s['holders']} holders' processes and whatever else ran (load averages above). "
            + (f"K lanes cannot train K times as fast on {cores} cores: the scaling goals (2 GPUs >= 1.85 x, 4 GPUs >= 3.5 x) cannot be met "
               "here and are recorded anyway, missed. " if cores < 2 * kmax else "")
            + "The scaling goals are for K physical GPUs (issue 7 of 7).")
    else:
        lines.append(f"Backend {s['backend']}: K lanes on the GPUs this machine has ({machine.get('gpu') or 'none seen'}); "
                     "K lanes on one GPU share its SMs, so the scaling goals are for K physical GPUs.")
    threads = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    lines += ["", "BLAS threads: " + (", ".join(f"{k}={v}" for k, v in threads.items()) if threads else "library defaults (no *_NUM_THREADS set)")
              + f" in every process of the runs; with K > 1 on the host backend the orchestrator caps its BLAS threads at "
              f"max(1, cores // K) = {max(1, cores // kmax)} at K = {kmax} for the run (gtbus.gpu.blas_threads). Whole bench: {wall:.0f} s."]
    return lines
