"""``gtbus bench``: measured numbers, printed as tables and kept under bench/results/."""

from __future__ import annotations

from pathlib import Path

import click

from gtbus.training.merge import DEFAULT_MERGE, MERGE_POLICIES


@click.group()
def bench() -> None:
    """Benchmarks (results go to bench/results/<name>-<host>.md and .json)."""


_OUT = click.option(
    "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"), show_default=True,
    help="Folder for the .md and .json results.",
)


@bench.command("bus")
@click.option("--seconds", type=click.FloatRange(min=0.05), default=4.0, show_default=True, help="Seconds of round trips, and again of one-way sends, per variant.")
@click.option("--payload", type=click.IntRange(min=0, max=4096), default=64, show_default=True, help="Echo payload bytes (an echo carries at most 4096).")
@click.option("--slices", type=click.IntRange(min=1), default=4, show_default=True, help="Interleaved slices the seconds are split into.")
@click.option("--profile/--no-profile", default=None, help="Profile the signed round trip (default: only if its median misses 300 us).")
@click.option("--loop", type=click.Choice(["asyncio", "uvloop"]), default="asyncio", show_default=True, help="Event loop of both ends (uvloop only if installed; nodes run asyncio's).")
@_OUT
def bus(seconds: float, payload: int, slices: int, profile: bool | None, loop: str, out_dir: Path) -> None:
    """Signed request/reply round trip and one-way throughput vs raw pyzmq, on loopback."""
    from gtbus.bench.bus import run_bus_bench

    res = run_bus_bench(out_dir, seconds=seconds, payload=payload, slices=slices, profile=profile, loop=loop, say=lambda s: click.echo(s, err=True))
    click.echo(res.text())
    click.echo("wrote " + ", ".join(res.data["files"]))


@bench.command("readme")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"), show_default=True, help="Folder of result .json files.")
@click.option("--readme", type=click.Path(dir_okay=False, path_type=Path), default=Path("README.md"), show_default=True)
@click.option("--check", is_flag=True, help="Only say whether the README's table is up to date (exit 1 if not).")
def readme(results: Path, readme: Path, check: bool) -> None:
    """Regenerate the README's measured table from the goals lists of the result files."""
    from gtbus.bench.readme_table import update_readme
    from gtbus.errors import ConfigError
    from gtbus.private_files import write_private

    try:
        old, new = update_readme(readme, results)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if check:
        if old != new:
            raise click.ClickException(f"{readme}'s measured table is out of date: run `gtbus bench readme`")
        click.echo(f"{readme}: measured table up to date")
        return
    if old != new:
        write_private(readme, new, mode=0o644)  # the README is public; written atomically
    click.echo(f"{readme}: measured table {'rewritten' if old != new else 'already up to date'}")


@bench.command("flood")
@click.option("--seconds", type=click.FloatRange(min=1.0), default=60.0, show_default=True, help="Seconds of the baseline window, and again of the flood.")
@_OUT
def flood(seconds: float, out_dir: Path) -> None:
    """One observer key floods a real orchestrator (junk, echoes): log growth and peak RSS vs the same run unflooded."""
    from gtbus.bench.flood import run_flood_bench

    res = run_flood_bench(out_dir, seconds=seconds, say=lambda s: click.echo(s, err=True))
    click.echo(res.text())
    click.echo("wrote " + ", ".join(res.data["files"]))


@bench.command("stream")
@click.option("--total-mib", type=click.FloatRange(min=8.0), default=512.0, show_default=True, help="Bytes streamed per repetition.")
@click.option("--reps", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--connections", default="1,2,4", show_default=True, help="Comma-separated connection counts to measure.")
@_OUT
def stream(total_mib: float, reps: int, connections: str, out_dir: Path) -> None:
    """Raw ZeroMQ stream throughput (CurveZMQ and plaintext, 4 MiB frames): the anchor ship mode is held to."""
    from gtbus.bench.stream import run_stream_bench

    try:
        counts = [int(c) for c in connections.split(",") if c.strip()]
    except ValueError:
        raise click.BadParameter(f"not a list of counts: {connections!r}", param_hint="--connections") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter("counts must be positive", param_hint="--connections")
    res = run_stream_bench(out_dir, total_mib=total_mib, reps=reps, connections=counts, say=lambda s: click.echo(s, err=True))
    click.echo(res.text())
    click.echo("wrote " + ", ".join(res.data["files"]))


@bench.command("travel")
@click.option("--backend", type=click.Choice(["host", "cupy"]), default="host", show_default=True)
@click.option("--trainer", type=click.Choice(["bytelm", "gpt2"]), default="bytelm", show_default=True, help="The workload every run trains (gpt2: GPT-2 124M in PyTorch; needs torch).")
@click.option("--total-mib", type=click.FloatRange(min=0.01), default=None, help="Hop-buffer bytes of the whole dataset (uint16 tokens), split evenly over the holders. Default: 24 (bytelm), 1200 (gpt2).")
@click.option("--caps", default=None, help="Comma-separated buffer caps: sizes like 32K, 1M, 4.5 (MiB when no unit), or 'uncapped' (one chunk per holder). Default: bytelm 1/64, 1/16, 1/4, 1/2 of a holder's data and uncapped; gpt2 the talk's 4,20,100,500,uncapped.")
@click.option("--train-steps", type=click.IntRange(min=1), default=None, help="Training steps of a whole run, split over the hops in proportion to their bytes (the same in every row and mode). Default: 3072 (bytelm), 600 (gpt2).")
@click.option("--holders", type=click.IntRange(min=1), default=None, help="Default: 3 (bytelm), 2 (gpt2).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, help="The orchestrator's --checkpoint-every. Default: 1 (bytelm), 100 (gpt2: a checkpoint is 1.6 GB).")
@click.option("--alone-steps", type=click.IntRange(min=1), default=None, help="Timed steps of the trainer-alone baseline. Default: 200 (bytelm), 100 (gpt2).")
@click.option("--chunk-mib", type=click.FloatRange(min=0.001), default=512.0, show_default=True, help="Chunk size of the provisioning-throughput measurement (host backend).")
@click.option("--reps", type=click.IntRange(min=1), default=3, show_default=True, help="Repetitions of the provisioning measurement (median reported).")
@click.option("--modes", default="ship,travel", show_default=True, help="Which modes to run.")
@click.option("--keep-runs", type=click.Path(file_okay=False, path_type=Path), default=None, help="Keep each run's folder (logs, keys, summaries) here instead of a temporary folder.")
@_OUT
def travel(backend: str, trainer: str, total_mib: float | None, caps: str | None, train_steps: int | None, holders: int | None, checkpoint_every: int | None,
           alone_steps: int | None, chunk_mib: float, reps: int, modes: str, keep_runs: Path | None, out_dir: Path) -> None:
    """The talk's table: transfer vs training time per buffer cap, ship vs travel, same run; the trainer alone; plus 512 MiB provisioning rate."""
    from gtbus.bench.travel import run_travel_bench

    res = run_travel_bench(
        out_dir, backend=backend, trainer=trainer, total_mib=total_mib, caps=caps, train_steps=train_steps, holders=holders,
        checkpoint_every=checkpoint_every, alone_steps=alone_steps, chunk_mib=chunk_mib, reps=reps,
        modes=[m.strip() for m in modes.split(",") if m.strip()], keep_runs=keep_runs, say=lambda s: click.echo(s, err=True),
    )
    click.echo(res.text())
    click.echo("wrote " + ", ".join(res.data["files"]))


@bench.command("device")
@click.option("--backend", type=click.Choice(["host", "cupy"]), default="cupy", show_default=True)
@click.option("--chunk-mib", type=click.FloatRange(min=0.001), default=512.0, show_default=True)
@click.option("--reps", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--sizes", default="4,20,100,500", show_default=True, help="Buffer sizes (MiB) of the transfer-share table.")
@click.option("--control-hops", type=click.IntRange(min=3), default=30, show_default=True)
@click.option("--ship-mib", type=click.FloatRange(min=0.01), default=512.0, show_default=True, help="Chunk of the travel-vs-ship comparison.")
@click.option("--gpt2/--no-gpt2", default=True, show_default=True, help="Measure GPT-2 124M throughput for the transfer share (needs torch).")
@click.option("--segment-mib", type=click.FloatRange(min=1, max=4), default=4.0, show_default=True, help="AEAD segment size of the provisioning figures.")
@click.option("--only-provisioning", is_flag=True, help="Stop after the provisioning and transfer-share tables.")
@_OUT
def device(backend: str, chunk_mib: float, reps: int, sizes: str, control_hops: int, ship_mib: float, gpt2: bool, segment_mib: float, only_provisioning: bool, out_dir: Path) -> None:
    """Device figures: encrypted provisioning vs plain copy, transfer share, control overhead, epilogue, travel vs ship."""
    from gtbus.bench.device import run_device_bench

    try:
        size_list = [float(x) for x in sizes.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{sizes!r}: comma-separated MiB numbers", param_hint="--sizes") from None
    res = run_device_bench(out_dir, backend=backend, chunk_mib=chunk_mib, reps=reps, sizes_mib=size_list, control_hops=control_hops,
                           ship_mib=ship_mib, gpt2=gpt2, segment_mib=segment_mib, only_provisioning=only_provisioning,
                           say=lambda s: click.echo(s, err=True))
    click.echo(res.text())
    click.echo("wrote " + ", ".join(res.data["files"]))


@bench.command("fleet")
@click.option("--gpus", "gpus_text", default="2,4", show_default=True, help="Comma-separated GPU counts (2 or more) to run beside the one-GPU baseline.")
@click.option("--backend", type=click.Choice(["host", "cupy"]), default="host", show_default=True, help="host: K emulated devices; cupy: K lanes on the GPUs there are.")
@click.option("--trainer", type=click.Choice(["bytelm", "gpt2"]), default="bytelm", show_default=True)
@click.option("--holders", type=click.IntRange(min=1), default=None, help="Holders of every run (default: the largest K; a holder is on one GPU at a time).")
@click.option("--chunk-tokens", type=click.IntRange(min=64), default=1 << 15, show_default=True, help="Tokens of a hop's chunk.")
@click.option("--chunks", "chunks_per_holder", type=click.IntRange(min=1), default=4, show_default=True, help="Chunks of each holder (one hop each).")
@click.option("--steps", "steps_per_hop", type=click.IntRange(min=1), default=8, show_default=True, help="Optimizer steps a hop (the same in every run).")
@click.option("--merge-every", type=click.IntRange(min=0), default=0, show_default=True, help="Average the replicas every N trained hops of the fleet (0: every K).")
@click.option("--compare-merge-every", "compare_text", default="", help="Comma-separated --merge-every values to run the largest K with as well: loss per wall-clock second of each.")
@click.option("--merge", default=DEFAULT_MERGE, show_default=True, help=f"How every K-GPU run merges its replicas: {MERGE_POLICIES}.")
@click.option("--compare-merge", "compare_merge_text", default="", help="Comma-separated --merge policies to run the largest K with as well: loss per wall-clock second of each.")
@click.option("--heldout-tokens", type=click.IntRange(min=1024), default=1 << 16, show_default=True, help="Tokens of the held-out shard each run's final model is scored on.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Runs of each configuration, interleaved; the tables take medians.")
@click.option("--keep-runs", type=click.Path(file_okay=False, path_type=Path), default=None, help="Keep each run's folder here instead of a temporary folder.")
@_OUT
def fleet(gpus_text: str, backend: str, trainer: str, holders: int | None, chunk_tokens: int, chunks_per_holder: int, steps_per_hop: int,
          merge_every: int, compare_text: str, merge: str, compare_merge_text: str, heldout_tokens: int, repeats: int, keep_runs: Path | None,
          out_dir: Path) -> None:
    """K GPU tokens at once vs one, same run: aggregate tokens/s, provisioning GB/s, held-out loss after the same tokens."""
    from gtbus.bench.fleet import parse_gpus, run_fleet_bench
    from gtbus.errors import GtbusError

    try:
        compare_merge_every = [int(x) for x in compare_text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{compare_text!r}: comma-separated numbers of trained hops", param_hint="--compare-merge-every") from None
    if any(x < 0 for x in compare_merge_every):
        raise click.BadParameter(f"{compare_text!r}: 0 (every K) or a positive number of trained hops", param_hint="--compare-merge-every")
    try:
        res = run_fleet_bench(out_dir, gpus=parse_gpus(gpus_text), backend=backend, trainer=trainer, holders=holders, chunk_tokens=chunk_tokens,
                              chunks_per_holder=chunks_per_holder, steps_per_hop=steps_per_hop, merge_every=merge_every,
                              compare_merge_every=compare_merge_every, merge=merge,
                              compare_merge=[p.strip() for p in compare_merge_text.split(",") if p.strip()], heldout_tokens=heldout_tokens, repeats=repeats, keep_runs=keep_runs,
                              say=lambda s: click.echo(s, err=True))
    except GtbusError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(res.text())
    click.echo("wrote " + ", ".join(res.data["files"]))
