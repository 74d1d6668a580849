"""``gtbus status``: the token's owner and epoch (a line per GPU token of a fleet), liveness, hops, bytes, loss; live with --watch."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import click

from gtbus.console import printable
from gtbus.messages.identity import NodeIdentity, Roster, load_identity


#: Lanes shown one a line; a larger fleet's others are counted on one more line.
SHOWN_LANES = 32


def _field(lane: dict[str, Any], key: str, width: int) -> str:
    value = lane.get(key)
    text = "?" if value is None or isinstance(value, (dict, list)) else str(value)
    return (text if len(text) <= 24 else text[:23] + "…").ljust(width)


def lane_lines(state: dict[str, Any], now: float | None = None) -> list[str]:
    """One line per GPU token of a fleet (its holder, epoch and phase); none for a single token (the token line says it)."""
    listed = state.get("lanes")
    lanes = [lane for lane in listed if isinstance(lane, dict)] if isinstance(listed, list) else []
    if len(lanes) < 2:
        return []
    now = time.time() if now is None else now
    busy = sum(1 for lane in lanes if lane.get("phase") in ("granted", "held", "returned"))
    lines = [f"gpus       {len(lanes)} tokens, {busy} on a hop"]
    for lane in lanes[:SHOWN_LANES]:
        line = f"  {_field(lane, 'id', 10)} holder {_field(lane, 'owner', 10)} epoch {_field(lane, 'epoch', 6)} phase {_field(lane, 'phase', 9)}"
        started = lane.get("hop_started")
        if lane.get("failed"):
            line += f" retired: {_field(lane, 'failed', 0)}"
        elif lane.get("phase") in ("granted", "held") and isinstance(started, (int, float)) and math.isfinite(started):
            line += f" for {max(0.0, now - float(started)):.1f} s"
        lines.append(line.rstrip())
    if len(lanes) > SHOWN_LANES:
        lines.append(f"  … and {len(lanes) - SHOWN_LANES} more")
    return lines


def render(state: dict[str, Any], started: float) -> str:
    """A person-readable block for one state."""
    tok = state.get("token", {})
    lanes = lane_lines(state)
    lines = [
        f"run        {state.get('run_id', '?')}   {'complete' if state.get('complete') else 'running'}",
        *(lanes or [f"token      owner {tok.get('owner', '?')}  epoch {tok.get('epoch', '?')}  phase {tok.get('phase', '?')}"]),
        f"hops       {state.get('hops_trained', 0)} trained of {state.get('hops', 0)}   round {int(state.get('round', 0)) + 1} of {state.get('rounds', '?')}",
    ]
    total = int(state.get("hops_total") or 0)
    if total:
        done = min(int(state.get("hops_trained", 0)), total)
        width = 30
        filled = round(width * done / total)
        lines.append(f"progress   [{'#' * filled}{'.' * (width - filled)}] {done}/{total} chunks trained ({100 * done / total:.0f} %)")
    if not lanes and tok.get("phase") in ("granted", "held") and state.get("hop_started"):  # a fleet says it per lane
        lines.append(f"this hop   {tok.get('owner')} has held the token for {max(0.0, time.time() - float(state['hop_started'])):.1f} s")
    nbytes = int(state.get("bytes", 0))
    since = float(state.get("started") or started)
    elapsed = max(time.time() - since, 1e-9)
    lines.append(f"bytes      {nbytes:,} provisioned  ({nbytes / elapsed / 1e6:.2f} MB/s averaged over the run so far)" if nbytes else "bytes      0")
    loss = state.get("last_loss")
    lines.append(f"loss       {loss:.3f} nats/token (on the last chunk, before training on it)" if loss is not None else "loss       -")
    live = state.get("liveness", {})
    if live:
        lines.append("liveness   " + "  ".join(f"{n}: {s:.1f}s ago" for n, s in sorted(live.items())))
    last = state.get("last_hop")
    report = state.get("last_report")  # only observers get reports: per-hop losses never reach holders
    if report and (not last or report["epoch"] >= last["epoch"]):
        before, after = report.get("eval_before"), report.get("eval_after")
        loss_text = f"   loss {before:.3f} -> {after:.3f}" if before is not None and after is not None else ""
        lines.append(f"last hop   epoch {report['epoch']} {report['holder']} chunk {report['chunk']}: {report['outcome']}{loss_text}")
    elif last:
        lines.append(f"last hop   epoch {last['epoch']} {last['holder']} chunk {last['chunk']}: {last['outcome']}")
    return "\n".join(printable(line) for line in lines)  # names and outcomes come from peers: one escaped line each


async def follow(
    identity: NodeIdentity,
    roster: Roster,
    router: str,
    pub: str,
    show: Callable[[dict[str, Any]], None],
    *,
    watch: bool = False,
    timeout: float = 5.0,
    refresh: float = 1.0,
) -> dict[str, Any]:
    """Join the deployment as an observer: snapshot, then (with ``watch``) live events until completion."""
    from gtbus.errors import GtbusError
    from gtbus.nodes.observer import Observer
    from gtbus.nodes.runtime import NodeRuntime
    from gtbus.nodes.wiring import client_transport, orchestrator_of

    with tempfile.TemporaryDirectory(prefix="gtbus-status-") as tmp:
        rt = NodeRuntime(identity, roster, client_transport(identity, roster, router, pub), run_dir=tmp, server=orchestrator_of(roster), heartbeat_interval=0)
        obs = Observer(rt, on_change=show if watch else None)
        await rt.start()
        try:
            try:
                state = await obs.sync(timeout)
            except asyncio.TimeoutError:
                raise GtbusError(f"no answer from the orchestrator at {router} within {timeout:.0f}s") from None
            show(state)
            last_sync = time.monotonic()
            missed = 0
            while watch and not state.get("complete"):
                try:
                    await asyncio.wait_for(obs.changed.wait(), refresh)
                    obs.changed.clear()
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() - last_sync >= refresh and not state.get("complete"):
                    # Liveness travels only in snapshots: refresh it every so often.
                    try:
                        state = await obs.sync(timeout)
                        last_sync = time.monotonic()
                        missed = 0
                        show(state)
                    except asyncio.TimeoutError:
                        missed += 1
                        if missed >= 3:
                            raise GtbusError(f"lost contact with the orchestrator at {router} before the run completed") from None
                        continue
                state = obs.follower.state or state
            return state
        finally:
            await rt.close()


def printer(as_json: bool, started: float) -> Callable[[dict[str, Any]], None]:
    """How states are shown: JSON lines, or a block redrawn in place on a terminal."""
    tty = sys.stdout.isatty()

    def show(state: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(state, sort_keys=True))
        else:
            click.echo(("\x1b[H\x1b[2J" if tty else "") + render(state, started) + ("" if tty else "\n"))

    return show


@click.command()
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), required=True, help="An observer (or any roster member's) secret key.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--router", default="tcp://127.0.0.1:7700", show_default=True)
@click.option("--pub", default="tcp://127.0.0.1:7701", show_default=True)
@click.option("--watch", is_flag=True, help="Keep a live view until the run completes (Ctrl-C to leave).")
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON (with --watch: one line per change).")
@click.option("--timeout", type=float, default=5.0, show_default=True)
@click.option("--refresh", type=float, default=1.0, show_default=True, help="With --watch: seconds between snapshot refreshes.")
def status(key_path: Path, keys_dir: Path, router: str, pub: str, watch: bool, as_json: bool, timeout: float, refresh: float) -> None:
    """Show a running deployment's state, from a snapshot plus live events."""
    identity = load_identity(key_path)
    roster = Roster.from_dir(keys_dir)
    show = printer(as_json, time.time())
    try:
        asyncio.run(follow(identity, roster, router, pub, show, watch=watch, timeout=timeout, refresh=refresh))
    except KeyboardInterrupt:
        pass
