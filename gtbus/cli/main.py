"""The ``gtbus`` command line: keys, nodes, demo, replay, bench, data.

Every failure a user can cause (missing file, bad key, bad option) ends in one
line on stderr naming what is wrong, and exit status 1 or 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from gtbus.console import configure_logging, printable
from gtbus.errors import GtbusError
from gtbus.messages.identity import NodeIdentity, Role, Roster, write_identity


class GtbusGroup(click.Group):
    """A click group that turns gtbus errors into one clean line."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except GtbusError as exc:
            # An error may quote a peer's value or a crafted file's: one escaped line.
            raise click.ClickException(printable(exc)) from None

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Run the command; a bad option or argument is one ``Error:`` line too, not a usage page."""
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            cmd = exc.ctx.command_path if exc.ctx is not None else "gtbus"
            click.echo(f"Error: {printable(exc.format_message())} (see `{cmd} --help`)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {printable(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("Aborted.", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=GtbusGroup)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """gtbus: confidential collaborative training where the GPU travels to the data."""
    import logging

    configure_logging(logging.WARNING - 10 * min(verbose, 2))


@main.command()
@click.argument("name")
@click.option("--role", type=click.Choice([r.value for r in Role]), default=Role.HOLDER.value, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for NAME.key and NAME.pub.")
@click.option("--force", is_flag=True, help="Overwrite existing keys of this name.")
@click.option("--platform", is_flag=True, help="Instead: the emulated platform attestation key (NAME.platform.key / .pub), for the GPU host.")
def keygen(name: str, role: str, out_dir: Path, force: bool, platform: bool) -> None:
    """Generate a node's Ed25519, X25519 and CURVE keys (NAME.key mode 0600, NAME.pub)."""
    if platform:
        from gtbus.gpu.platform_key import write_platform_key

        key_path, pub_path = write_platform_key(out_dir, name, overwrite=force)
        click.echo(f"wrote {key_path} (secret, mode 0600, stays on the GPU host) and {pub_path} (holders pin this)")
        return
    ident = NodeIdentity.generate(name, role)
    key_path, pub_path = write_identity(ident, out_dir, overwrite=force)
    click.echo(f"wrote {key_path} (secret, mode 0600) and {pub_path} (share this one)")
    click.echo(f"ed25519 {ident.public.ed25519.hex()}")


def _parse_time(value: str | None, what: str) -> float | None:
    """Seconds since the epoch from a number, an ISO date-time, or HH:MM[:SS] today."""
    if value is None:
        return None
    import datetime as dt

    try:
        return float(value)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        pass
    try:
        t = dt.time.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a time (seconds, ISO date-time or HH:MM[:SS])", param_hint=what) from None
    return dt.datetime.combine(dt.date.today(), t).timestamp()


def _parse_epochs(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    lo, sep, hi = value.partition(":")
    try:
        a = int(lo) if lo else 0
        b = int(hi) if sep and hi else (a if not sep else 2**63)
    except ValueError:
        raise click.BadParameter(f"{value!r}: use N or A:B", param_hint="--epoch") from None
    return a, b


def _proof(rep: Any) -> str:
    """What the signed checkpoints prove of a verified log, for its ``ok`` line."""
    if rep.unsigned_tail:
        return (f"; unsigned tail of {rep.unsigned_tail} records (no signed checkpoint covers them: checked, "
                f"but records there could have been dropped or added)")
    return "; signed and closed" if rep.closed else "; signed, not closed (a crash, or cut at a checkpoint)"


def _step(items: list, show_detail) -> None:  # type: ignore[no-untyped-def]
    """Interactive stepping: n(ext), p(revious), j EPOCH (jump), g INDEX (go), q(uit)."""
    i = 0
    while items:
        click.echo(f"[{i + 1}/{len(items)}] " + show_detail(items[i]))
        try:
            cmd = input("n/p/j EPOCH/g INDEX/q> ").strip().split()
        except EOFError:
            return
        if not cmd or cmd[0] in ("n", "next"):
            i = min(i + 1, len(items) - 1)
        elif cmd[0] in ("p", "prev", "previous"):
            i = max(i - 1, 0)
        elif cmd[0] in ("j", "jump") and len(cmd) == 2 and cmd[1].isdigit():
            hit = next((k for k, e in enumerate(items) if e.header is not None and e.header.epoch >= int(cmd[1])), None)
            if hit is None:
                click.echo(f"no message at epoch {cmd[1]} or later")
            else:
                i = hit
        elif cmd[0] in ("g", "go") and len(cmd) == 2 and cmd[1].isdigit():
            i = min(max(int(cmd[1]) - 1, 0), len(items) - 1)
        elif cmd[0] in ("q", "quit"):
            return
        else:
            click.echo("commands: n, p, j EPOCH, g INDEX, q")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Check every signature, sequence and signed checkpoint; exit 1 naming the first bad record. Records after the last checkpoint are reported as an unsigned tail.")
@click.option("--redrive", "redrive_node", metavar="NODE", help="Feed NODE's recorded inputs through its state machine; exit 1 at the first decision that differs.")
@click.option("--node", "nodes", multiple=True, help="Only logs of this node (repeatable).")
@click.option("--type", "types", multiple=True, help="Only this message type or family, e.g. token (repeatable).")
@click.option("--since", help="Only records at or after this local time (seconds, ISO, or HH:MM[:SS]).")
@click.option("--until", help="Only records at or before this local time.")
@click.option("--epoch", "epoch_range", help="Only messages of token epoch N, or A:B.")
@click.option("--step", is_flag=True, help="Step through the timeline interactively (n, p, j EPOCH, g INDEX, q).")
@click.option("--keys", "keys_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path), help="Trusted public keys to verify against, repeatable (default: the roster in each log's first record).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--timeline", is_flag=True, help="Draw the run (token holding per GPU and per holder, hop outcomes, loss) from the orchestrator's verified log into --out.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), help="With --timeline: the picture, FILE.svg or FILE.html (written atomically, mode 0600).")
def replay(path: Path, verify: bool, redrive_node: str | None, nodes: tuple[str, ...], types: tuple[str, ...], since: str | None, until: str | None, epoch_range: str | None, step: bool, keys_dirs: tuple[Path, ...], as_json: bool, timeline: bool, out_path: Path | None) -> None:
    """Show, verify, step through, re-drive or draw recorded message logs (a .gtlog file or a folder).

    Several nodes' logs are merged into one timeline ordered by causality: a
    message is shown sent before it is shown received.
    """
    if timeline or out_path is not None:
        _draw_timeline(path, out_path if timeline else None, keys_dirs, as_json)
        return
    from gtbus.recording import log_files
    from gtbus.replay.verify import verify_log
    from gtbus.replay.view import entries, format_detail, format_entry, in_window, select, timeline

    if verify:
        rosters = [Roster.from_dir(d) for d in keys_dirs] or None
        bad = 0
        reports = []
        for p in log_files(path):
            rep = verify_log(p, rosters)
            if nodes and rep.node and rep.node not in nodes:
                continue
            reports.append(rep)
            if not rep.ok:
                bad += 1
                if not as_json:
                    click.echo(f"FAIL {printable(rep.error)}", err=True)
            elif not as_json:
                click.echo(printable(f"ok   {p} node={rep.node} verified={rep.checked} rejected-on-receipt={rep.rejected_records}{_proof(rep)}"))
        if as_json:
            click.echo(json.dumps([{"path": str(r.path), "node": r.node, "ok": r.ok, "verified": r.checked, "rejected": r.rejected_records,
                                    "records": r.records, "proven": r.proven, "unsigned_tail": r.unsigned_tail, "closed": r.closed,
                                    "error": r.error} for r in reports], indent=1))
        if bad:
            sys.exit(1)
        return
    if redrive_node is not None:
        from gtbus.recording import iter_log
        from gtbus.replay.redrive import redrive

        files = [p for p in log_files(path) if (first := next(iter_log(p), None)) is not None and first.data.get("node") == redrive_node]
        # A node with a second link keeps a second log; its main one is NODE.gtlog.
        files.sort(key=lambda p: p.stem != redrive_node)
        if not files:
            raise click.ClickException(f"no log of node {redrive_node!r} under {path}")
        name, diff = redrive(files[0], redrive_node)
        if as_json:
            click.echo(json.dumps({"node": name, "log": str(files[0]), "difference": str(diff) if diff else None}))
        elif diff is None:
            click.echo(f"{name}: every decision re-driven from {files[0]} matches the log")
        else:
            click.echo(printable(f"{name}: {files[0]}: {diff}"), err=True)
        if diff is not None:
            sys.exit(1)
        return
    items = timeline(select(entries(path), nodes=nodes, types=types))
    items = list(in_window(items, since=_parse_time(since, "--since"), until=_parse_time(until, "--until"), epochs=_parse_epochs(epoch_range)))
    if step:
        _step(items, format_detail)
        return
    for e in items:
        if as_json:
            h = e.header
            click.echo(json.dumps({"node": e.node, "t": e.time, "dir": e.record.data.get("dir"), "verdict": e.record.data.get("verdict"), "type": h.type if h else None, "sender": h.sender if h else None, "recipient": h.recipient if h else None, "seq": h.seq if h else None, "epoch": h.epoch if h else None, "id": h.id.hex() if h else None}, default=repr))
        else:
            click.echo(format_entry(e))


def _draw_timeline(path: Path, out: Path | None, keys_dirs: tuple[Path, ...], as_json: bool) -> None:
    """``replay --timeline PATH --out FILE``: the picture of a run, from its orchestrator's verified log."""
    from gtbus.errors import ConfigError
    from gtbus.replay.hop_spans import read_hops
    from gtbus.replay.timeline import renderer_for, summary_line, write_picture

    if out is None:
        raise click.UsageError("--out goes with --timeline, and --timeline needs --out FILE.svg or FILE.html")
    try:
        renderer_for(out)  # an unknown suffix is told before any log is read
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--out") from None
    rosters = [Roster.from_dir(d) for d in keys_dirs] or None
    run = read_hops(path, rosters)
    write_picture(run, out)
    if as_json:
        click.echo(json.dumps({"out": str(out), "run_id": run.run_id, "gpus": len(run.tokens), "holders": len(run.holders),
                               "hops": len(run.hops), "outcomes": run.outcomes()}))
    else:
        click.echo(printable(f"wrote {out}: run {run.run_id}, {summary_line(run)}"))


def _register_subcommands() -> None:
    # Each area owns its command module; main only assembles them.
    from gtbus.cli import attest as attest_cmd
    from gtbus.cli import bench as bench_cmd
    from gtbus.cli import data as data_cmd
    from gtbus.cli import export as export_cmd
    from gtbus.cli import receipt as receipt_cmd
    from gtbus.cli import nodes as nodes_cmd
    from gtbus.cli import runbook as runbook_cmd
    from gtbus.cli import sample as sample_cmd
    from gtbus.cli import sim as sim_cmd
    from gtbus.cli import status as status_cmd

    main.add_command(data_cmd.data)
    main.add_command(export_cmd.export)
    main.add_command(receipt_cmd.holder_receipt)
    main.add_command(attest_cmd.attest)
    main.add_command(bench_cmd.bench)
    main.add_command(status_cmd.status)
    main.add_command(runbook_cmd.runbook)
    main.add_command(sim_cmd.sim)
    main.add_command(sample_cmd.sample)
    for cmd in nodes_cmd.COMMANDS:
        main.add_command(cmd)


_register_subcommands()
