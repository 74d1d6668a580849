"""The ``gtbus`` command line: keys, nodes, demo, replay, bench, data.

Every failure a user can cause (missing file, bad key, bad option) ends in one
line on stderr naming what is wrong, and exit status 1 or 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from gtbus.errors import GtbusError
from gtbus.messages.identity import NodeIdentity, Role, Roster, write_identity


class GtbusGroup(click.Group):
    """A click group that turns gtbus errors into one clean line."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except GtbusError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=GtbusGroup)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """gtbus: confidential collaborative training where the GPU travels to the data."""
    import logging

    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


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


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Check every signature and sequence; exit 1 naming the first bad record.")
@click.option("--node", "nodes", multiple=True, help="Only logs of this node (repeatable).")
@click.option("--type", "types", multiple=True, help="Only this message type or family, e.g. token (repeatable).")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path), help="Trusted public keys to verify against (default: the roster recorded in each log).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def replay(path: Path, verify: bool, nodes: tuple[str, ...], types: tuple[str, ...], keys_dir: Path | None, as_json: bool) -> None:
    """Show or verify recorded message logs (a .gtlog file or a folder of them)."""
    from gtbus.recording import log_files
    from gtbus.replay.verify import verify_log
    from gtbus.replay.view import entries, format_entry, select

    if verify:
        roster = Roster.from_dir(keys_dir) if keys_dir else None
        bad = 0
        reports = []
        for p in log_files(path):
            rep = verify_log(p, roster)
            if nodes and rep.node and rep.node not in nodes:
                continue
            reports.append(rep)
            if not rep.ok:
                bad += 1
                if not as_json:
                    click.echo(f"FAIL {rep.error}", err=True)
            elif not as_json:
                click.echo(f"ok   {p} node={rep.node} verified={rep.checked} rejected-on-receipt={rep.rejected_records}")
        if as_json:
            click.echo(json.dumps([{"path": str(r.path), "node": r.node, "ok": r.ok, "verified": r.checked, "rejected": r.rejected_records, "error": r.error} for r in reports], indent=1))
        if bad:
            sys.exit(1)
        return
    for e in select(entries(path), nodes=nodes, types=types):
        if as_json:
            h = e.header
            click.echo(json.dumps({"node": e.node, "t": e.time, "dir": e.record.data.get("dir"), "verdict": e.record.data.get("verdict"), "type": h.type if h else None, "sender": h.sender if h else None, "recipient": h.recipient if h else None, "seq": h.seq if h else None, "epoch": h.epoch if h else None}, default=repr))
        else:
            click.echo(format_entry(e))


def _register_subcommands() -> None:
    # Each area owns its command module; main only assembles them.
    from gtbus.cli import bench as bench_cmd
    from gtbus.cli import data as data_cmd
    from gtbus.cli import nodes as nodes_cmd
    from gtbus.cli import status as status_cmd

    main.add_command(data_cmd.data)
    main.add_command(bench_cmd.bench)
    main.add_command(status_cmd.status)
    for cmd in nodes_cmd.COMMANDS:
        main.add_command(cmd)


_register_subcommands()
