"""``gtbus bench travel``: the talk's transfer-share table, and the encrypted provisioning rate.

Part 1, the table (talk, "Data transfer overhead"): for each buffer cap (the
bytes one hop carries; ``uncapped`` = one chunk per holder) the same dataset
is trained on twice in the same invocation, once in **ship** mode (the
conventional path: the holder streams AEAD segments over ZeroMQ to the
orchestrator, which decrypts on its CPU and copies to the device) and once in
**travel** mode (the holder writes ciphertext into the hop's fresh staging
buffer, the device decrypts). Every run is a real deployment: orchestrator and
holders are separate processes talking CURVE ZeroMQ over loopback
(:class:`~gtbus.nodes.launcher.LocalDeployment`). The numbers are the run
summaries': ``transfer_s`` (grant to plaintext in the device buffer, summed over
hops), ``train_s`` and ``transfer_share`` = transfer / (transfer + training),
the talk's "Tx Percentage".

Every run goes through what a user runs: the holders' shards are made by
``gtbus data build``, the pin they trust is what a ``gtbus measure --backend B
--trainer T`` process prints, and the nodes are started by the CLI.

The training budget is the same in every row and mode: ``--train-steps``
optimizer steps per run, split over the hops in proportion to their bytes
(the orchestrator's ``--steps per:N``; the rules are
:mod:`gtbus.bench.travel_plan`'s). The trainer alone, in its own process
(:mod:`gtbus.bench.trainer_alone`), gives the tokens/s that training inside the
loop is compared with.

Workloads (``--trainer``): ``bytelm`` (CPU-sized; by default the caps are
relative to the data, :func:`default_caps`: 1/64, 1/16, 1/4 and 1/2 of a
holder's bytes, then uncapped) and ``gpt2`` (GPT-2 124M in PyTorch, for a GPU:
by default the talk's caps 4M, 20M, 100M, 500M and uncapped on 2 holders x
600 MiB, 600 steps a run, a checkpoint every 100 hops; sized to fit one
10-minute device run, bench/notes-perf.md "GPT-2 table" says how). Goals:
travel Tx % <= 0.05 at every cap, tokens/s in the loop >= 0.95 x alone; where a
run is too short to show 0.05 %, an arithmetic table says what it would need.

Part 2, provisioning throughput of one 512 MiB chunk on this machine: the
holder's :class:`~gtbus.gpu.channel.SegmentSealer` seals into a fresh staging
buffer mapped the way a holder maps it (``Device.map_staging`` by handle), then
the device's ``open_segments`` authenticates and decrypts into a private
buffer; next to it, a plain numpy copy of 512 MiB in the same process.
"""

from __future__ import annotations

import json
import os
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
from gtbus.bench.travel_plan import MIB, TALK_CAPS, Cap, Plan, default_caps, hop_steps, parse_caps, parse_size, plan, size_label
from gtbus.errors import ConfigError, GtbusError
from gtbus.protocol.admission import TOKEN_BYTES
from gtbus.training.checkpoint import read_checkpoint

GOAL_GBPS_CPU = 1.0  # DESIGN: >= 1 GB/s encrypted travel provisioning on the 2-core box
GOAL_TX_PERCENT = 0.05  # the talk's and the issue's: travel Tx <= 0.05 % of transfer + training at every cap
GOAL_LOOP_RATIO = 0.95  # training tokens/s inside the loop >= 0.95 x the trainer alone



# ------------------------------------------------------------------------------ data


def write_holder_shards(out_dir: Path, holders: int, tokens: int) -> list[Path]:
    """One llm.c shard per holder of ``tokens`` byte tokens, made by ``gtbus data build`` as a user makes one.

    The text is the Python stdlib sources split round-robin between holders,
    repeated to the size (bytes are valid ids of both workloads' vocabularies).
    """
    import subprocess
    import sys

    from gtbus.training.corpus import holder_bytes, split_round_robin, stdlib_sources

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, files in enumerate(split_round_robin(stdlib_sources(), holders)):
        text = numpy.frombuffer(holder_bytes(files, min(tokens, 64 * MIB)), dtype=numpy.uint8)
        source = out_dir / f"holder{i:02d}.txt"
        source.write_bytes((numpy.resize(text, tokens) if len(text) < tokens else text[:tokens]).tobytes())
        shard = out_dir / f"holder{i:02d}.bin"
        done = subprocess.run([sys.executable, "-m", "gtbus", "data", "build", str(source), "--out", str(shard)], capture_output=True, text=True)
        source.unlink()
        if done.returncode != 0:
            raise GtbusError(f"gtbus data build failed for holder {i}: {(done.stderr.strip().splitlines() or ['(no output)'])[-1]}")
        paths.append(shard)
    return paths


# ------------------------------------------------------------------------------ one deployment run


@dataclass(frozen=True)
class Workload:
    """Who trains what in every run of the table: the workload, its backend, the holders' pin, the checkpoint interval."""

    trainer: str
    backend: str
    pin: str
    checkpoint_every: int


def run_once(run_dir: Path, *, mode: str, row: dict[str, Any], p: Plan, shards: Sequence[Path], work: Workload) -> dict[str, Any]:
    """One full run (orchestrator + holder processes, started by the CLI) of one row and mode; its summary plus per-hop sums."""
    from gtbus.nodes.launcher import LocalDeployment, LocalRun

    chunk_bytes = row["cap_bytes"]
    lease = 30.0 + chunk_bytes / 20e6  # ship mode moves big chunks through signed messages
    run = LocalRun(
        run_dir=run_dir, holders=p.holders, mode=mode, rounds=1, chunk_tokens=row["chunk_tokens"],
        steps=p.steps_option, lease=lease, backend=work.backend, data=list(shards), trainer=work.trainer,
        pin=work.pin, checkpoint_every=work.checkpoint_every,
    )
    dep = LocalDeployment(run)
    timeout = 180.0 + row["hops"] * 3.0 + row["steps_total"] * 0.5 + chunk_bytes * row["hops"] / 5e6
    first_hop: list[float] = []

    def on_line(line: str) -> None:
        if line.startswith("hop") and not first_hop:
            first_hop.append(time.perf_counter())

    t0 = time.perf_counter()
    summary = dep.run_to_end(on_line, timeout=timeout)
    wall = time.perf_counter() - t0
    hops = _hop_details(Path(summary["checkpoint"]))
    trained = [h for h in hops if h.get("outcome") == "trained"]
    steps = sum(_steps_of(h, p) for h in trained)
    first = trained[0] if trained else {}
    first_hop_s = sum(first.get(k, 0.0) for k in ("provision_s", "open_s", "train_s", "eval_s", "epilogue_s"))
    busy = sum(h.get(k, 0.0) for h in trained for k in ("provision_s", "open_s", "train_s", "eval_s", "epilogue_s"))
    return {
        **summary,
        "wall_s": wall,
        # Process start .. the first hop began: interpreter, imports, model build, device context, registration.
        "startup_s": (first_hop[0] - t0 - first_hop_s) if first_hop else wall,
        # What else the wall time holds: per-hop control, measurements, checkpoints, the run's end.
        "other_s": wall - busy - ((first_hop[0] - t0 - first_hop_s) if first_hop else 0.0),
        "provision_s": sum(h.get("provision_s", 0.0) for h in trained),
        "open_s": sum(h.get("open_s", 0.0) for h in trained),
        "epilogue_s": sum(h.get("epilogue_s", 0.0) for h in trained),
        "steps_total": steps,
        # Every trained hop's transfer in order (ms), so one slow hop is seen without --keep-runs.
        "hop_tx_ms": [round((h.get("provision_s", 0.0) + h.get("open_s", 0.0)) * 1e3, 3) for h in trained],
    }


def _steps_of(hop: dict[str, Any], p: Plan) -> int:
    return hop_steps(int(hop.get("nbytes", 0)) // TOKEN_BYTES, p.tokens_per_step_budget)


def _hop_details(checkpoint: Path) -> list[dict[str, Any]]:
    try:
        return read_checkpoint(checkpoint, state=False).hops
    except ConfigError:
        return []


# ------------------------------------------------------------------------------ provisioning throughput


def measure_provisioning(chunk_bytes: int, reps: int, backend: str = "host", segment_size: int = MIB) -> dict[str, Any]:
    """Seal a chunk into fresh staging as a holder does, open it on the device; and a plain memcpy of it."""
    from gtbus.gpu.backends import make_device
    from gtbus.gpu.channel import ChannelParams, SegmentContext, SegmentSealer, segment_count, staging_size

    device = make_device(backend)
    device_cls = type(device)
    rng = numpy.random.default_rng(0)
    plain = rng.integers(0, 256, size=chunk_bytes, dtype=numpy.uint8)
    count = segment_count(chunk_bytes, segment_size)
    runs: list[dict[str, float]] = []
    for rep in range(reps):
        t_alloc = time.perf_counter()
        staging, handle = device.alloc_hop_staging(staging_size(chunk_bytes, segment_size))
        out = device.alloc(chunk_bytes)
        params = ChannelParams.generate(str(handle), chunk_bytes, segment_size=segment_size)
        ctx = SegmentContext("bench", rep + 1, "h1", count)
        t0 = time.perf_counter()
        mapping = device_cls.map_staging(handle)
        t1 = time.perf_counter()
        if hasattr(mapping, "seal_into"):  # the backend's own holder-side path (host: SegmentSealer into the mapping)
            mapping.seal_into(memoryview(plain), params, ctx)
        else:
            SegmentSealer(params).seal_into(plain, mapping.view, ctx)
        t2 = time.perf_counter()
        device_cls.unmap(mapping)
        t3 = time.perf_counter()
        device.open_segments(staging, out, params, ctx, count, chunk_bytes)
        t4 = time.perf_counter()
        # The same staging opened again into a private buffer whose pages are
        # already faulted in: what a pooled, pre-touched data buffer would give.
        warm = device.alloc(chunk_bytes)
        device.scrub(warm)  # writes every page once
        t5 = time.perf_counter()
        device.open_segments(staging, warm, params, ctx, count, chunk_bytes)
        t6 = time.perf_counter()
        device.release(warm)
        check = device.as_array(out, numpy.uint8)
        head = numpy.asarray(check[:4096].get() if hasattr(check, "get") else check[:4096])
        tail = numpy.asarray(check[-4096:].get() if hasattr(check, "get") else check[-4096:])
        if not (numpy.array_equal(head, plain[:4096]) and numpy.array_equal(tail, plain[-4096:])):
            raise RuntimeError("provisioning bench: decrypted chunk differs from the plaintext")
        del check
        device.release(staging)
        device.release(out)
        runs.append({
            "alloc_s": t0 - t_alloc, "map_s": t1 - t0, "seal_s": t2 - t1, "unmap_s": t3 - t2, "open_s": t4 - t3,
            "end_to_end_s": t4 - t0, "with_alloc_s": t4 - t_alloc, "open_prefaulted_s": t6 - t5,
        })
    dst = numpy.empty_like(plain)
    dst.fill(1)  # fault the pages in first: measure the copy, not the page faults
    copies = []
    for _ in range(max(3, reps)):
        t0 = time.perf_counter()
        numpy.copyto(dst, plain)
        copies.append(time.perf_counter() - t0)
    del dst, plain

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    gb = chunk_bytes / 1e9
    return {
        "chunk_bytes": chunk_bytes,
        "segment_size": segment_size,
        "segments": count,
        "reps": reps,
        "backend": backend,
        "runs": runs,
        "median_s": {k: med(k) for k in runs[0]},
        "seal_gbps": gb / med("seal_s"),
        "open_gbps": gb / med("open_s"),
        "end_to_end_gbps": gb / med("end_to_end_s"),
        "with_alloc_gbps": gb / med("with_alloc_s"),
        "open_prefaulted_gbps": gb / med("open_prefaulted_s"),
        "memcpy_s": statistics.median(copies),
        "memcpy_gbps": gb / statistics.median(copies),
    }


# ------------------------------------------------------------------------------ the benchmark

#: Defaults per workload: (holders, total MiB, caps, train steps, checkpoint every, trainer-alone steps).
#: gpt2: 2 holders x 600 MiB, so that 500M is a real cap (500 + 100 MiB a holder); 600 steps = one per
#: 2 MiB of tokens, which divides every talk cap (exact split); a checkpoint (1.6 GB) every 100 hops.
WORKLOAD_DEFAULTS: dict[str, tuple[int, float, str | None, int, int, int]] = {
    "bytelm": (3, 24.0, None, 3072, 1, 200),
    # 300 steps a run (one per 4 MiB of a hop's tokens): the whole table fits one 10-minute
    # device call on an H200. With 600 the call was cut off in its tenth run (startup was
    # 12-16 s a run, not the ~7 s predicted; bench/notes-perf.md, "GPT-2 table").
    "gpt2": (2, 1200.0, TALK_CAPS, 300, 100, 100),
}


def _alone(trainer: str, backend: str, shard: Path, tokens: int, steps: int) -> dict[str, Any]:
    """The trainer alone, in its own process (:mod:`gtbus.bench.trainer_alone`)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "gtbus.bench.trainer_alone", "--trainer", trainer, "--backend", backend, "--shard", str(shard),
           "--tokens", str(tokens), "--steps", str(steps), "--warmup", str(max(3, steps // 10))]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise GtbusError(f"trainer alone failed: {(done.stderr.strip().splitlines() or ['(no output)'])[-1]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def run_travel_bench(
    out_dir: str | os.PathLike[str] | None = "bench/results",
    *,
    backend: str = "host",
    trainer: str = "bytelm",
    total_mib: float | None = None,
    caps: str | None = None,
    train_steps: int | None = None,
    holders: int | None = None,
    chunk_mib: float = 512.0,
    reps: int = 3,
    modes: Sequence[str] = ("ship", "travel"),
    keep_runs: Path | None = None,
    checkpoint_every: int | None = None,
    alone_steps: int | None = None,
    say: Callable[[str], None] = print,
) -> Result:
    """Run the table, the trainer alone and the provisioning measurement; write ``travel-<backend>[-gpt2]-<host>.md/.json``.

    Unset sizes take the workload's :data:`WORKLOAD_DEFAULTS`.
    """
    from gtbus.nodes.launcher import measure_pin
    from gtbus.training.workloads import make_trainer

    if trainer not in WORKLOAD_DEFAULTS:
        raise ConfigError(f"unknown trainer {trainer!r} ({', '.join(WORKLOAD_DEFAULTS)})")
    for m in modes:
        if m not in ("ship", "travel"):
            raise ConfigError(f"unknown mode {m!r} (ship, travel)")
    d_holders, d_total, d_caps, d_steps, d_every, d_alone = WORKLOAD_DEFAULTS[trainer]
    holders = holders or d_holders
    total_mib = total_mib or d_total
    caps = caps if caps is not None else d_caps
    train_steps = train_steps or d_steps
    checkpoint_every = checkpoint_every or d_every
    alone_steps = alone_steps or d_alone
    cfg = make_trainer(trainer).config  # type: ignore[attr-defined]
    context = int(cfg.context)
    window = getattr(cfg, "eval_sequences", None) or getattr(cfg, "eval_windows", 0)
    evaluation = f"up to {window} evenly spaced windows of {context + 1} tokens"
    cap_list = parse_caps(caps, total_mib, holders)
    p = plan(cap_list, total_mib, holders, train_steps, min_chunk_tokens=context + 1)
    machine = machine_info()
    name = f"travel-{backend}" + ("" if trainer == "bytelm" else f"-{trainer}")
    res = Result(name, f"gtbus bench travel ({backend} backend, {trainer}): transfer share per buffer cap, ship vs travel", machine)
    total_tokens = p.holder_tokens * holders
    say(
        f"travel bench ({trainer}): {holders} holders x {p.holder_tokens * TOKEN_BYTES / MIB:.4g} MiB of hop bytes, caps "
        f"{', '.join(r['cap'] for r in p.rows)}, {train_steps} training steps per run ({p.steps_option}), modes {', '.join(modes)}; "
        f"load {machine['load_at_start']}"
    )
    settings = {"backend": backend, "trainer": trainer, "total_mib": total_mib, "caps": caps, "train_steps": train_steps, "holders": holders,
                "chunk_mib": chunk_mib, "reps": reps, "modes": list(modes), "checkpoint_every": checkpoint_every, "alone_steps": alone_steps}
    prov: dict[str, Any] | None = None
    tmp = None if keep_runs else tempfile.mkdtemp(prefix="gtbus-bench-travel-")
    base = Path(keep_runs or tmp)  # type: ignore[arg-type]
    runs: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        shards = write_holder_shards(base / "data", holders, p.holder_tokens)
        data_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pin = measure_pin(backend, trainer)
        pin_s = time.perf_counter() - t0
        say(f"  shards by `gtbus data build` in {data_s:.1f} s; pin by `gtbus measure --backend {backend} --trainer {trainer}` in {pin_s:.1f} s")
        alone = _alone(trainer, backend, shards[0], min(p.holder_tokens, 1 << 26), alone_steps)
        say(f"  trainer alone: {alone['tokens_per_s']:,.0f} tokens/s ({alone['steps']} steps of {alone['tokens_per_step']} tokens, "
            f"{alone['warmup_steps']} warm-up steps not counted), load {alone['load_s']:.1f} s, process {alone['process_s']:.1f} s")
        work = Workload(trainer, backend, pin, checkpoint_every)
        report = _Report(res, Path(out_dir) if out_dir is not None else None, p, work, caps, alone, data_s, pin_s, evaluation, reps,
                         total_tokens, settings)
        for i, row in enumerate(p.rows):
            order = list(modes) if i % 2 == 0 else list(reversed(modes))  # alternate, so drift in load hits both
            for mode in order:
                say(f"  cap {row['cap']}: {mode}, {row['hops']} hops of {size_label(row['cap_bytes'])}, {row['steps_per_hop']} steps each ...")
                s = run_once(base / f"{i:02d}-{mode}", mode=mode, row=row, p=p, shards=shards, work=work)
                if tmp is not None:  # read already; a GPT-2 checkpoint is 1.6 GB a run
                    shutil.rmtree(base / f"{i:02d}-{mode}" / "checkpoints", ignore_errors=True)
                if s["hops_trained"] != row["hops"]:
                    say(f"    warning: {s['hops_trained']} of {row['hops']} hops trained ({s['outcomes']})")
                s["tokens_per_s"] = s["steps_total"] * alone["tokens_per_step"] / s["train_s"] if s["train_s"] > 0 else 0.0
                say(f"    transfer {s['transfer_s']:.3f} s, training {s['train_s']:.2f} s ({s['tokens_per_s']:,.0f} tokens/s), "
                    f"share {s['transfer_share'] * 100:.3f} %, startup {s['startup_s']:.1f} s, wall {s['wall_s']:.1f} s")
                runs.append({"row": i, "cap": row["cap"], "mode": mode, **{k: s[k] for k in _KEEP if k in s}})
                report.fill(runs, prov, time.perf_counter() - t_start, done=False)
        if backend == "host":
            say(f"  provisioning: {reps} x {chunk_mib:g} MiB sealed into fresh staging and opened on the device ...")
            prov = measure_provisioning(int(chunk_mib * MIB), reps, backend)
        # On a GPU the holder must be another process (a CUDA IPC handle does not open
        # in the process that exported it): `gtbus bench device` measures that.
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return report.fill(runs, prov, time.perf_counter() - t_start, done=True)


@dataclass(frozen=True)
class _Report:
    """What a travel bench's result is made of besides its runs: fixed once the shards, the pin and the trainer alone are measured."""

    res: Result
    out_dir: Path | None
    p: Plan
    work: Workload
    caps: str | None
    alone: dict[str, Any]
    data_s: float
    pin_s: float
    evaluation: str
    reps: int
    total_tokens: int
    settings: dict[str, Any]

    def fill(self, runs: list[dict[str, Any]], prov: dict[str, Any] | None, wall_total: float, *, done: bool) -> Result:
        """Tables, goals and data of the runs so far; written to ``out_dir`` (after every run, so a cut-off bench leaves what it measured)."""
        res, p, alone = self.res, self.p, self.alone
        res.tables.clear()
        res.goals.clear()
        res.finish()  # end time and load so far (stamped again by the next call)

        res.header = _header(p, self.work, self.caps, alone, self.data_s, self.pin_s, runs, wall_total, self.evaluation)
        res.tables.append(_share_table(p, runs, res.machine))
        res.tables.append(_loop_table(runs, alone))
        res.tables.append(_one_pass_table(p, runs, self.total_tokens))
        res.tables.append(_detail_table(runs))
        for r in runs:
            if r["mode"] == "travel":
                res.goal(f"travel Tx % at cap {r['cap']}", r["transfer_share"] * 100, GOAL_TX_PERCENT, "%", at_most=True)
        for r in runs:
            if alone["tokens_per_s"] > 0:
                res.goal(f"tokens/s in loop / alone, {r['mode']} at cap {r['cap']}", r["tokens_per_s"] / alone["tokens_per_s"], GOAL_LOOP_RATIO, "ratio")
        if prov is None:
            res.header.append("Encrypted provisioning of a 512 MiB chunk on this backend: see `gtbus bench device` (a separate holder process maps the staging by CUDA IPC).")
        else:
            res.tables.append(_provisioning_table(prov, self.work.backend, self.reps))

        if not done:
            res.header.insert(0, f"PARTIAL: {len(runs)} of {len(self.settings['modes']) * len(p.rows)} runs so far (the bench writes its result after every run; this one did not finish).")
        res.data = {
            "settings": self.settings,
            "plan": {"holder_tokens": p.holder_tokens, "rows": p.rows, "steps_option": p.steps_option, "note": p.rounded_note},
            "startup": {"data_build_s": self.data_s, "pin_s": self.pin_s, "wall_s": wall_total},
            "alone": alone,
            "runs": runs,
            "provisioning": prov,
        }
        if self.out_dir is not None:
            md, js = res.write(self.out_dir)
            res.data["files"] = [str(md), str(js)]
        return res


def _header(p: Plan, work: Workload, caps: str | None, alone: dict[str, Any], data_s: float, pin_s: float,
            runs: list[dict[str, Any]], wall: float, evaluation: str) -> list[str]:
    trainer, backend, every = work.trainer, work.backend, work.checkpoint_every
    holders, total = p.holders, p.holder_tokens * TOKEN_BYTES * p.holders
    per_step = alone["tokens_per_step"]
    budget_s = p.train_steps * per_step / alone["tokens_per_s"] if alone["tokens_per_s"] else 0.0
    startups = sorted(r["startup_s"] for r in runs)
    lines = [
        "",
        f"Dataset: {holders} holders x {p.holder_tokens:,} tokens (uint16, {p.holder_tokens * TOKEN_BYTES / MIB:.4g} MiB of hop bytes each, "
        f"{total / MIB:.4g} MiB in all; llm.c shards made by `gtbus data build` from the Python stdlib sources split round-robin, repeated as needed). "
        + ("Caps: 1/64, 1/16, 1/4 and 1/2 of a holder's data, standing for the talk's 4M/20M/100M/500M rows; " if caps is None else f"Caps as given: {caps}; ")
        + "uncapped = one chunk per holder. " + (p.rounded_note + ". " if p.rounded_note else ""),
        "",
        f"Training budget: {p.train_steps} {trainer} optimizer steps per run ({per_step:,} tokens a step), the same in both modes and every row, "
        f"split over the hops in proportion to their bytes: a hop of n tokens trains max(1, round(n / {p.tokens_per_step_budget:,})) steps "
        f"(orchestrator --steps {p.steps_option}); about {budget_s:.1f} s a run at the trainer-alone rate. Real training in every hop.",
        "",
        f"Every run is a real deployment started by the CLI (`python -m gtbus orchestrator/holder ... --backend {backend} --trainer {trainer}`, "
        f"CURVE ZeroMQ on loopback, one round over all chunks); the holders pin what `gtbus measure --backend {backend} --trainer {trainer}` "
        f"printed ({pin_s:.1f} s, its own process). Checkpoint after every {every} hops and the last. "
        "Tx = the run summary's transfer_s (grant to plaintext in the device buffer), Tx % = transfer / (transfer + training), as in the talk. "
        "ship = holder streams AEAD segments over the bus to the orchestrator, which decrypts on its CPU and copies to the device; "
        "travel = holder seals into the hop's fresh staging, the device decrypts.",
        "",
        "Training s is the summary's train_s (train_on, ended by reading the last loss back: synchronised); the orchestrator's held-out "
        f"evaluations (before and after each hop, on {evaluation} of the hop's chunk) are counted apart as eval_s; "
        "the summary's first and last loss are the first and the last hop's evaluation before training on it.",
        "",
        f"Startup (measured): shards {data_s:.1f} s, pin {pin_s:.1f} s, trainer alone load {alone['load_s']:.1f} s "
        f"(process {alone['process_s']:.1f} s); per run, process start to first hop: "
        + (f"median {startups[len(startups) // 2]:.1f} s (min {startups[0]:.1f}, max {startups[-1]:.1f}). " if startups else "-. ")
        + f"Whole bench: {wall:.0f} s.",
    ]
    return lines


def _share_table(p: Plan, runs: list[dict[str, Any]], machine: dict[str, Any]) -> Table:
    t = Table(
        "Transfer vs training per buffer cap (the talk's table)",
        ["cap", "ship training s", "ship tx s", "ship tx %", "travel training s", "travel tx s", "travel tx %", "hops", "steps/hop",
         "travel tx/hop ms", "travel training/hop s", "ship/travel tx"],
    )
    by = {(r["row"], r["mode"]): r for r in runs}
    for i, row in enumerate(p.rows):
        steps = str(row["steps_per_hop"]) + (f" (last {row['last_steps']})" if row["last_steps"] != row["steps_per_hop"] else "")
        cells: list[str] = [row["cap"]]
        for mode in ("ship", "travel"):
            r = by.get((i, mode))
            cells += [f"{r['train_s']:.2f}", f"{r['transfer_s']:.3f}", f"{r['transfer_share'] * 100:.3f}%"] if r else ["-", "-", "-"]
        cells += [str(row["hops"]), steps]
        tr = by.get((i, "travel"))
        hops = max(1, tr["hops_trained"]) if tr else 1
        cells += [f"{tr['transfer_s'] / hops * 1e3:.2f}", f"{tr['train_s'] / hops:.3f}"] if tr else ["-", "-"]
        ratio = "-"
        if (i, "ship") in by and tr and tr["transfer_s"] > 0:
            ratio = f"{by[(i, 'ship')]['transfer_s'] / tr['transfer_s']:.1f}x"
        t.add(*cells, ratio)
    trains = [r["train_s"] for r in runs if r["train_s"] > 0]
    if trains and max(trains) > 1.3 * min(trains):
        t.notes.append(
            f"training s ranges {min(trains):.1f}-{max(trains):.1f} s over runs with the same step budget: per-call costs of many short "
            f"train_on calls, or other work on this machine (load {machine['load_at_start']} at start, {machine['load_at_end']} at end)"
        )
    t.notes.append("talk (llm.c, GPT-2, H100 CC): ship tx 47.6 % at 4M down to 0.59 % uncapped; travel 0.08 % at every cap. Goal: travel <= 0.05 % at every cap")
    return t


def _loop_table(runs: list[dict[str, Any]], alone: dict[str, Any]) -> Table:
    t = Table(f"Training inside the loop vs the trainer alone ({alone['tokens_per_s']:,.0f} tokens/s, {alone['steps']} steps, own process)",
              text_columns=2, columns=["cap", "mode", "steps", "tokens/s in loop", "/ alone", "startup s", "other s", "wall s"])
    for r in runs:
        ratio = r["tokens_per_s"] / alone["tokens_per_s"] if alone["tokens_per_s"] else 0.0
        t.add(r["cap"], r["mode"], r["steps_total"], f"{r['tokens_per_s']:,.0f}", f"{ratio:.3f}", f"{r['startup_s']:.1f}", f"{r['other_s']:.1f}", f"{r['wall_s']:.1f}")
    t.notes.append("tokens/s in loop = steps x tokens a step / the summary's train_s; startup = process start to the first hop; "
                   "other = wall - startup - (transfer + training + evaluation + epilogue of every hop): per-hop control, measurements, checkpoints, the end")
    return t


def _one_pass_table(p: Plan, runs: list[dict[str, Any]], total_tokens: int) -> Table:
    t = Table("Arithmetic from the measured numbers (not a measurement): a one-pass budget, and what 0.05 % would need",
              ["cap", "travel tx s (measured)", "one-pass training s (arith.)", "travel tx % vs one pass (arith.)",
               "training/hop for 0.05 % s (arith.)", "training/hop in this run s"])
    for r in runs:
        if r["mode"] != "travel":
            continue
        one_pass = total_tokens / r["tokens_per_s"] if r["tokens_per_s"] else 0.0
        share = r["transfer_s"] / (r["transfer_s"] + one_pass) * 100 if one_pass else 0.0
        hops = max(1, r["hops_trained"])
        need = r["transfer_s"] / hops * (100 - GOAL_TX_PERCENT) / GOAL_TX_PERCENT
        t.add(r["cap"], f"{r['transfer_s']:.3f}", f"{one_pass:.0f}", f"{share:.4f}%", f"{need:.2f}", f"{r['train_s'] / hops:.3f}")
    t.notes.append(f"one pass = every one of the {total_tokens:,} tokens trained once, at the run's measured tokens/s in the loop; "
                   "0.05 % needs training per hop = 1999 x Tx per hop; the talk's runs held ~1230 s of training per row")
    return t


def _detail_table(runs: list[dict[str, Any]]) -> Table:
    d = Table("Per-run detail", text_columns=2, columns=["cap", "mode", "hops trained", "provision s", "open s", "epilogue s", "eval s", "steps", "wall s", "MB/s (bytes / tx)",
                                                       "tx ms per hop: median / max", "loss first -> last"])
    for r in runs:
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" if r.get("last_loss") is not None else "-"
        tx = r.get("hop_tx_ms") or []
        d.add(r["cap"], r["mode"], r["hops_trained"], f"{r['provision_s']:.3f}", f"{r['open_s']:.3f}", f"{r['epilogue_s']:.3f}", f"{r.get('eval_s', 0.0):.2f}",
              r["steps_total"], f"{r['wall_s']:.1f}", f"{r['provision_gbps'] * 1000:.1f}",
              f"{statistics.median(tx):.2f} / {max(tx):.2f}" if tx else "-", loss)
    d.notes.append("provision = grant sent .. return received (key, seal, grant, holder checks and writes, return); open = authenticate + decrypt into the private buffer (ship: also the copy to the device); "
                   "epilogue (scrub, verify zero, release) is not counted in Tx; loss = held-out evaluation of the first and the last hop's chunk before training on it")
    return d


def _provisioning_table(prov: dict[str, Any], backend: str, reps: int) -> Table:
    pv = Table(
        f"Encrypted provisioning of one {size_label(prov['chunk_bytes'])} chunk ({backend} backend, AES-256-GCM, {size_label(prov['segment_size'])} segments, median of {reps})",
        ["step", "seconds", "GB/s"],
    )
    ms = prov["median_s"]
    pv.add("holder: map staging by handle", f"{ms['map_s']:.4f}", "-")
    pv.add("holder: seal into staging (incl. ciphertext digest)", f"{ms['seal_s']:.4f}", f"{prov['seal_gbps']:.2f}")
    pv.add("holder: unmap", f"{ms['unmap_s']:.4f}", "-")
    pv.add("device: open_segments into private buffer", f"{ms['open_s']:.4f}", f"{prov['open_gbps']:.2f}")
    pv.add("end to end (map .. plaintext on device)", f"{ms['end_to_end_s']:.4f}", f"{prov['end_to_end_gbps']:.2f}")
    pv.add("device: allocate fresh staging + private buffer", f"{ms['alloc_s']:.4f}", "-")
    pv.add("end to end incl. that allocation (as a hop's transfer_s counts it)", f"{ms['with_alloc_s']:.4f}", f"{prov['with_alloc_gbps']:.2f}")
    pv.add("plain memcpy (numpy copyto, same size, pages faulted in)", f"{prov['memcpy_s']:.4f}", f"{prov['memcpy_gbps']:.2f}")
    pv.add("(for comparison: open again into a pre-faulted private buffer)", f"{ms['open_prefaulted_s']:.4f}", f"{prov['open_prefaulted_gbps']:.2f}")
    verdict = "meets" if prov["end_to_end_gbps"] >= GOAL_GBPS_CPU else "misses"
    pv.notes.append(f"end to end {prov['end_to_end_gbps']:.2f} GB/s {verdict} the design's >= {GOAL_GBPS_CPU:g} GB/s for this CPU box; that is {prov['end_to_end_gbps'] / prov['memcpy_gbps'] * 100:.0f} % of a plain memcpy")
    pv.notes.append(
        "each repetition, open / end to end in s: "
        + ", ".join(f"{r['open_s']:.3f} / {r['end_to_end_s']:.3f}" for r in prov["runs"])
        + " (the first one in a fresh process pays the kernel's first-touch cost in full)"
    )
    pv.notes.append(
        "the private buffer is fresh per hop (as the orchestrator allocates it), so open_segments pays one page fault per 4 KiB on first write; "
        "the last row shows the decrypt rate itself once the pages exist"
    )
    pv.notes.append("holder and device run in this one process here (in a run they are separate processes); seal and open use every core (cryptography's encrypt_into/decrypt_into release the GIL)")
    return pv


_KEEP = (
    "hops", "hops_trained", "outcomes", "bytes_provisioned", "transfer_s", "train_s", "transfer_share", "provision_gbps",
    "provision_s", "open_s", "epilogue_s", "steps_total", "wall_s", "first_loss", "last_loss", "final_train_loss", "eval_s",
    "startup_s", "other_s", "tokens_per_s", "hop_tx_ms",
)
