"""``gtbus sim``: the whole deployment simulated in one process, deterministically from seeds, under faults.

A failing seed prints the one line that runs it again and the events that led
there; the exit status is 1 when any invariant failed.
"""

from __future__ import annotations

import json
import sys

import click

from gtbus.console import printable

#: How many of a failing seed's last events are printed.
TRACE_SHOWN = 25


def _describe(r: object) -> str:
    from gtbus.testing.sim import SeedResult

    assert isinstance(r, SeedResult)
    cfg = r.config
    end = "finished" if r.finished else f"stopped: {r.stopped}" if r.stopped else "did not end"
    hostile = ", ".join(f"{h} {b}" for h, b in sorted(cfg.hostile.items())) or "none"
    fleet = (f", {cfg.gpus} GPUs merging every {cfg.merge_every} trained hops (hops per GPU {r.lane_hops}, "
             f"{r.requeued} trainings thrown away with a replica and done again)") if cfg.gpus > 1 else ""
    p = r.prepared
    ahead = f"; {p['made']} hops prepared ahead, {p['used']} used, {p['discarded']} guesses wrong" if p.get("made") else ""
    return (
        f"seed {r.seed}: {len(cfg.holders)} holders ({len(cfg.remote)} remote), {cfg.rounds} round(s), {len(r.faults)} faults, hostile: {hostile}{fleet}; "
        f"{r.hops} hops, {r.trained} trained, {end} at t={r.sim_time:.2f}s ({r.steps} steps){ahead}"
    )


def report_failure(r: object, shrunk: object | None = None) -> None:
    """Print a failing seed: its repro line and violations; then, shrunk to the faults that
    still make it fail, that repro line, those faults and its last events (on stderr)."""
    from gtbus.testing.sim import SeedResult

    assert isinstance(r, SeedResult)
    click.echo(f"FAIL {r.repro}", err=True)
    for v in r.violations:
        click.echo(f"  {printable(str(v))}", err=True)
    s = shrunk if isinstance(shrunk, SeedResult) else r
    if s is not r and s.kept is not None:
        kept = s.kept
        click.echo(f"  shrunk to {len(kept)} of {len(r.faults)} faults: {s.repro}", err=True)
        for i in kept:
            click.echo(f"    fault {i}: {printable(s.faults[i])}", err=True)
    click.echo(f"  last {min(TRACE_SHOWN, len(s.trace))} events:", err=True)
    for line in s.trace[-TRACE_SHOWN:]:
        click.echo(f"    {printable(line)}", err=True)


def _fault_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    if value == "none":
        return []
    try:
        out = sorted({int(x) for x in value.split(",")})
    except ValueError:
        raise click.BadParameter(f"not a list of fault numbers: {value!r} (e.g. 0,3 or none)", param_hint="--faults") from None
    if any(i < 0 for i in out):
        raise click.BadParameter("fault numbers are 0 or more", param_hint="--faults")
    return out


@click.command()
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Run this one seed and describe it.")
@click.option("--seeds", "count", type=click.IntRange(min=1), default=None, help="Run this many seeds (from --first).")
@click.option("--first", type=click.IntRange(min=0), default=0, show_default=True, help="First seed of --seeds.")
@click.option("--no-faults", is_flag=True, help="No crashes, pauses, partitions, skew or message faults.")
@click.option("--no-hostile", is_flag=True, help="Every holder honest.")
@click.option("--faults", "only_faults", default=None, metavar="LIST",
              help="With --seed: apply only these of its faults (numbers as a failing seed prints them, e.g. 0,3; or none).")
@click.option("--gpus", type=click.IntRange(min=1, max=64), default=1, show_default=True,
              help="GPU tokens travelling at once (a fleet: lanes handed work by the fleet schedule, replicas merged).")
@click.option("--lockstep", is_flag=True, help="With --gpus K: hops start in waves and the replicas merge after every wave (--merge lockstep).")
@click.option("--json", "as_json", is_flag=True, help="Print the totals as JSON (seeds, hops, violations, hops_per_s, ...).")
def sim(seed: int | None, count: int | None, first: int, no_faults: bool, no_hostile: bool, only_faults: str | None, gpus: int,
        lockstep: bool, as_json: bool) -> None:
    """Simulate whole deployments (orchestrator, holders, device agent, observer) from seeds, checking every invariant after every step."""
    from gtbus.testing.sim import run_seed, run_seeds, shrink

    keep = _fault_list(only_faults)
    if keep is not None and seed is None:
        raise click.UsageError("--faults goes with --seed")

    if seed is not None and count is not None:
        raise click.UsageError("give --seed or --seeds, not both")
    faults, hostile = not no_faults, not no_hostile
    if seed is not None:
        r = run_seed(seed, faults=faults, hostile=hostile, keep_faults=keep, gpus=gpus, lockstep=lockstep)
        if as_json:
            click.echo(json.dumps({"seed": r.seed, "gpus": gpus, "hops": r.hops, "hops_trained": r.trained, "hops_per_gpu": r.lane_hops, "requeued": r.requeued,
                                   "prepared_hops": r.prepared, "finished": r.finished, "stopped": r.stopped, "violations": [str(v) for v in r.violations], "repro": r.repro}))
        else:
            click.echo(_describe(r))
        if not r.ok:
            report_failure(r, shrink(r) if keep is None else r)
            sys.exit(1)
        return
    summary = run_seeds(count or 1000, first=first, faults=faults, hostile=hostile, gpus=gpus, lockstep=lockstep)
    for r in summary.failures:
        report_failure(r, shrink(r))
    if as_json:
        click.echo(json.dumps({**summary.to_json(), "gpus": gpus}))
    else:
        click.echo(
            f"{summary.seeds} seeds, {summary.hops} hops ({summary.trained} trained), {summary.violations} violations, "
            f"{summary.hops_per_s:,.0f} hops/s, {summary.seconds:.1f}s; finished {summary.finished}, stopped {sum(summary.stopped.values())}; "
            f"hops prepared ahead {summary.prepared['made']}, used {summary.prepared['used']}, guesses wrong {summary.prepared['discarded']}"
        )
    if summary.failures:
        sys.exit(1)
