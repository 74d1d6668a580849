"""``gtbus runbook check|up|status|down FILE``: deployments described by runbooks."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import click


@click.group()
def runbook() -> None:
    """Check, bring up, watch and take down a deployment described by a runbook (runbooks/*.toml)."""


@runbook.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def check(file: Path) -> None:
    """Validate the runbook: schema, hosts, key files (owner-only), public keys, data, ports. One line per problem."""
    from gtbus.runbook.config import load_runbook
    from gtbus.runbook.control import check as run_check
    from gtbus.runbook.control import read_state

    rb = load_runbook(file)  # a schema problem is one `Error:` line (the group maps ConfigError), and nothing has run
    problems = run_check(rb, up=read_state(rb) is not None)
    for p in problems:
        click.echo(p, err=True)
    if problems:
        raise SystemExit(1)
    click.echo(f"{file}: ok ({len(rb.hosts)} hosts, {len(rb.nodes)} nodes)")


@runbook.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def up(file: Path) -> None:
    """Start the orchestrator, then every holder, on their hosts; record them in a state file."""
    from gtbus.runbook.config import load_runbook
    from gtbus.runbook.control import check as run_check
    from gtbus.runbook.control import state_path
    from gtbus.runbook.control import up as run_up

    rb = load_runbook(file)
    problems = run_check(rb)
    if problems:
        for p in problems:
            click.echo(p, err=True)
        raise click.ClickException(f"{len(problems)} problem(s); nothing started")
    run_up(rb, say=click.echo)
    click.echo(f"up: state in {state_path(rb)}; watch with `gtbus runbook status {file} --watch`")


@runbook.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--watch", is_flag=True, help="Follow the run live until it completes.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--timeout", type=float, default=5.0, show_default=True)
def status(file: Path, watch: bool, as_json: bool, timeout: float) -> None:
    """Liveness of every node process, and the run's state from the orchestrator (needs an observer node)."""
    from gtbus.cli.status import follow, printer
    from gtbus.messages.identity import Role, Roster, load_identity
    from gtbus.runbook.config import load_runbook
    from gtbus.runbook.control import node_states

    rb = load_runbook(file)
    states = node_states(rb)
    if as_json:
        click.echo(json.dumps({"processes": [s.__dict__ for s in states]}))
    else:
        for s in states:
            click.echo(f"{s.name:<10} {s.role:<13} {s.host:<10} pid {s.pid:<8} {'running' if s.alive else 'exited'}")
    observers = rb.nodes_by_role(Role.OBSERVER)
    local_obs = [o for o in observers if rb.hosts[o.host].local]
    if not local_obs:
        click.echo("(no observer node on this machine in the runbook: run state not shown)", err=True)
        return
    orch = rb.orchestrator
    base = Path(rb.hosts[local_obs[0].host].workdir)
    identity = load_identity(base / local_obs[0].key)
    roster = Roster.from_dir(base / rb.keys)
    asyncio.run(follow(identity, roster, orch.router, orch.pub, printer(as_json, time.time()), watch=watch, timeout=timeout))


@runbook.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--grace", type=float, default=10.0, show_default=True, help="Seconds between SIGTERM and SIGKILL.")
def down(file: Path, grace: float) -> None:
    """Stop every node: SIGTERM, a grace period, then SIGKILL; remove the state file."""
    from gtbus.runbook.config import load_runbook
    from gtbus.runbook.control import down as run_down

    rb = load_runbook(file)
    run_down(rb, grace, say=click.echo)
    click.echo(f"down: {rb.name}")
