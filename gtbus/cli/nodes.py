"""Node commands: ``gtbus orchestrator``, ``gtbus holder``, ``gtbus measure``, ``gtbus demo``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import click

from gtbus.console import printable
from gtbus.errors import ConfigError
from gtbus.gpu.backends import device_class, make_device, make_devices
from gtbus.messages.identity import Roster, load_identity
from gtbus.nodes.run_config import MAX_GPUS
from gtbus.private_files import private_dir, write_private
from gtbus.training.merge import DEFAULT_MERGE, MERGE_POLICIES
from gtbus.training.trainer import parse_steps
from gtbus.training.workloads import make_trainer


#: Seconds a holder that refused the orchestrator's measurement stays connected, so its Refusal arrives.
REFUSAL_STAY_S = 5.0


def _hop_line(h: Any, gpus: int = 1) -> str:
    rate = h.nbytes / h.transfer_s / 1e6 if h.transfer_s > 0 else 0.0
    loss = f"loss {h.eval_before:.3f} -> {h.eval_after:.3f}" if h.eval_after is not None else printable(h.detail)
    lane = f"gpu{h.lane}  " if gpus > 1 else ""
    return (
        f"{lane}hop {h.epoch:>3}  round {h.round}  {h.holder:<6} chunk {h.chunk:<3} {h.mode:<6} "
        f"{h.nbytes / 1024:>8.0f} KiB  provision {h.transfer_s * 1e3:>7.1f} ms ({rate:>7.1f} MB/s)  "
        f"train {h.train_s:>6.2f} s  {h.outcome:<9} {loss}"
    )


@click.command()
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), required=True, help="This node's secret key file.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder of the deployment's *.pub files.")
@click.option("--platform-key", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The emulated platform's attestation key.")
@click.option("--router", default="tcp://127.0.0.1:7700", show_default=True)
@click.option("--pub", default="tcp://127.0.0.1:7701", show_default=True)
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--backend", type=click.Choice(["host", "cupy"]), default="host", show_default=True)
@click.option("--trainer", "trainer_name", default="bytelm", show_default=True)
@click.option("--mode", type=click.Choice(["travel", "ship"]), default="travel", show_default=True)
@click.option("--rounds", type=int, default=1, show_default=True, help="Training epochs over all chunks.")
@click.option("--chunk-tokens", type=int, default=1 << 17, show_default=True)
@click.option("--steps", default="pass", show_default=True, help="Steps per hop, 'pass' for one pass over the chunk, or 'per:N' for one step per N tokens of the hop's chunk (a run's steps split over hops in proportion to their bytes).")
@click.option("--lease", type=float, default=10.0, show_default=True, help="Seconds a holder may keep the token.")
@click.option("--holders", default="", help="Comma-separated holders of this run (default: every holder in --keys).")
@click.option("--resume", is_flag=True, help="Continue a killed run from its checkpoint.")
@click.option("--max-chunks", type=int, default=1 << 16, show_default=True, help="Most chunks one holder may register (bounds schedule and checkpoint).")
@click.option("--absent-timeout", type=float, default=60.0, show_default=True, help="Seconds to wait when no holder with work left can be reached, then stop.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1, show_default=True, help="Write the checkpoint after every Nth hop and the last (a GPT-2 checkpoint is 1.6 GB); a resume then repeats up to N-1 hops, and a rollback trains them again (the checkpoint is also written at each round's end).")
@click.option("--gpus", type=click.IntRange(min=1, max=MAX_GPUS), default=1, show_default=True, help="GPU tokens travelling at once (lanes): host backend, emulated devices; cupy, K lanes on this process's GPU.")
@click.option("--merge-every", type=click.IntRange(min=0), default=0, show_default=True, help="With several GPUs: merge the replicas every N trained hops of the fleet (0: every --gpus hops), and at each round's end; hops in flight finish before a merge, so N below --gpus acts as --gpus. The checkpoint is written at merges.")
@click.option("--merge", "merge", default=DEFAULT_MERGE, show_default=True, help=f"With several GPUs, how replicas are merged: {MERGE_POLICIES}.")
@click.option("--prepare/--no-prepare", default=True, show_default=True, help="With one GPU in travel mode: while a hop runs, send the next hop's staging and sealed key to the holder the schedule names next (token.prepare), so it is ready when granted.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), help="Write the run summary here.")
@click.option("--fault", default="", hidden=True, help="Failure injection for drills and tests (tamper-model-at-epoch=N).")
def orchestrator(key_path: Path, keys_dir: Path, platform_key: Path, router: str, pub: str, run_dir: Path, backend: str, trainer_name: str, mode: str, rounds: int, chunk_tokens: int, steps: str, lease: float, holders: str, resume: bool, max_chunks: int, absent_timeout: float, checkpoint_every: int, gpus: int, merge_every: int, merge: str, prepare: bool, json_out: Path | None, fault: str) -> None:
    """Run the orchestrator: own the model, send the GPU token (or K of them) to each holder in turn."""
    from gtbus.gpu.platform_key import load_platform_signer
    from gtbus.messages.identity import Role
    from gtbus.nodes.faults import orchestrator_fault_hook
    from gtbus.nodes.orchestrator import Orchestrator, RunConfig
    from gtbus.nodes.runtime import NodeRuntime
    from gtbus.nodes.wiring import server_transport

    identity = load_identity(key_path)
    private_dir(run_dir)  # logs, state and checkpoints: this user only
    roster = Roster.from_dir(keys_dir)
    platform = load_platform_signer(platform_key)
    names = [h.strip() for h in holders.split(",") if h.strip()] or [m.name for m in roster.by_role(Role.HOLDER)]
    for n in names:
        if n not in roster:
            raise ConfigError(f"holder {n!r} has no public key in {keys_dir}")
    tamper = orchestrator_fault_hook(fault)
    cfg = RunConfig(
        run_dir=run_dir, holders=names, rounds=rounds, chunk_tokens=chunk_tokens, mode=mode, lease=lease,
        steps_per_hop=parse_steps(steps), resume=resume,
        trainer=trainer_name, max_chunks=max_chunks, absent_timeout=absent_timeout, checkpoint_every=checkpoint_every,
        gpus=gpus, merge_every=merge_every, merge=merge, prepare=prepare,
    )

    async def main() -> dict[str, Any]:
        rt = NodeRuntime(identity, roster, server_transport(identity, roster, router, pub), run_dir=run_dir)
        # One seed for every replica: the lanes start from the same model.
        trainers = [make_trainer(trainer_name) for _ in range(gpus)]
        orch = Orchestrator(rt, make_devices(backend, gpus), trainers, platform, cfg, on_hop=lambda h: click.echo(_hop_line(h, gpus)), tamper_hook=tamper)
        await rt.start()
        click.echo(f"orchestrator {identity.name}: listening on {rt.transport.endpoints[0]} / {rt.transport.endpoints[1]}; waiting for {', '.join(names)}", err=True)
        try:
            summary = await orch.run()
            await asyncio.sleep(1.0)  # let the shutdown event reach subscribers; answer last snapshots
            return summary
        finally:
            await rt.close()

    summary = asyncio.run(main())
    if json_out:
        write_private(json_out, json.dumps(summary, indent=1))
    click.echo(
        f"run {summary['run_id']}: {summary['hops_trained']}/{summary['hops']} hops trained, "
        f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}, transfer share {summary['transfer_share'] * 100:.3f} %"
        if summary["last_loss"] is not None else f"run {summary['run_id']}: nothing trained ({summary['outcomes']})"
    )


@click.command()
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--platform-pub", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The pinned platform public key.")
@click.option("--pin-code", required=True, help="The code measurement (hex) this holder trusts; see `gtbus measure`.")
@click.option("--data", "data_paths", multiple=True, required=True, type=click.Path(path_type=Path), help="Token shard(s) or, with --raw, raw files.")
@click.option("--raw", is_flag=True)
@click.option("--router", default="tcp://127.0.0.1:7700", show_default=True)
@click.option("--pub", default="tcp://127.0.0.1:7701", show_default=True)
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--backend", type=click.Choice(["host", "cupy"]), default="host", show_default=True)
@click.option("--chunk-tokens", type=int, default=None, help="Expect this chunk size (default: take the run's, announced at registration).")
@click.option("--orchestrator-timeout", type=float, default=120.0, show_default=True, help="Give up (exit 1) after this many seconds without a word from the orchestrator.")
@click.option("--agent", "agent_name", default=None, help="For a holder on another server than the GPU: the device agent to write through.")
@click.option("--agent-router", default=None, help="The device agent's request endpoint.")
@click.option("--agent-pub", default=None, help="The device agent's event endpoint.")
@click.option("--attest-policy", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The policy (TOML) the orchestrator's evidence must meet before the first provisioning; default: its platform key is --platform-pub and its code --pin-code.")
@click.option("--receipts", "receipts_dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Where to keep the orchestrator's signed receipts of this holder's hops (default: RUN_DIR/receipts/NAME).")
@click.option("--fault", default="", hidden=True, help="Failure injection for drills and tests.")
def holder(key_path: Path, keys_dir: Path, platform_pub: Path, pin_code: str, data_paths: tuple[Path, ...], raw: bool, router: str, pub: str, run_dir: Path, backend: str, chunk_tokens: int | None, orchestrator_timeout: float, agent_name: str | None, agent_router: str | None, agent_pub: str | None, attest_policy: Path | None, receipts_dir: Path | None, fault: str) -> None:
    """Run a data holder: register its dataset and write a chunk each time the token comes."""
    from gtbus.attest.appraiser import appraiser_for
    from gtbus.attest.policy import PolicySettings, emulated_policy, load_policy
    from gtbus.gpu.attestation import AttestationError, EmulatedReportVerifier
    from gtbus.messages.types import Refusal
    from gtbus.gpu.platform_key import load_platform_public
    from gtbus.nodes.faults import HolderFaults
    from gtbus.nodes.holder import Holder
    from gtbus.nodes.runtime import NodeRuntime
    from gtbus.nodes.wiring import client_transport, orchestrator_of
    from gtbus.training.shards import Dataset

    identity = load_identity(key_path)
    private_dir(run_dir)  # logs, state and checkpoints: this user only
    roster = Roster.from_dir(keys_dir)
    try:
        pinned = bytes.fromhex(pin_code)
    except ValueError:
        raise ConfigError(f"--pin-code is not hex: {pin_code[:20]!r}") from None
    platform_public = load_platform_public(platform_pub)
    verifier = EmulatedReportVerifier(platform_public, pinned)
    settings = load_policy(attest_policy) if attest_policy else PolicySettings(emulated_policy(platform_public, pinned), None)
    appraiser = appraiser_for(settings)
    dataset = Dataset(list(data_paths), raw=raw, name=identity.name)

    if agent_name and not (agent_router and agent_pub):
        raise ConfigError("--agent needs --agent-router and --agent-pub")

    async def main() -> None:
        rt = NodeRuntime(identity, roster, client_transport(identity, roster, router, pub), run_dir=run_dir, server=orchestrator_of(roster))
        via = None
        if agent_name:
            assert agent_router and agent_pub
            via = NodeRuntime(identity, roster, client_transport(identity, roster, agent_router, agent_pub, server_name=agent_name),
                              run_dir=run_dir, server=agent_name, log_name=f"{identity.name}-to-{agent_name}", heartbeat_interval=0)
        h = Holder(rt, dataset, device_class(backend), verifier, chunk_tokens=chunk_tokens, faults=HolderFaults.parse(fault),
                   orchestrator_timeout=orchestrator_timeout,
                   on_event=lambda s: click.echo(printable(s), err=True), agent=via, appraiser=appraiser, receipts_dir=receipts_dir)
        await rt.start()
        if via is not None:
            await via.start()
        try:
            await h.run()
        except AttestationError as exc:
            # Say why before leaving: the orchestrator then stops with this reason
            # instead of granting to a holder that is gone until its absent timeout.
            # Stay (refusing grants) until it has acted (its Shutdown) or a few
            # seconds: a message sent just before the socket closes can be lost.
            await rt.send(Refusal("measurement-refused", str(exc)))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(h.done.wait(), REFUSAL_STAY_S)
            raise
        finally:
            if via is not None:
                await via.close()
            await rt.close()

    asyncio.run(main())


@click.command()
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The agent's secret key.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--router", default="tcp://127.0.0.1:7700", show_default=True, help="The orchestrator's request endpoint.")
@click.option("--pub", default="tcp://127.0.0.1:7701", show_default=True, help="The orchestrator's event endpoint.")
@click.option("--listen-router", required=True, help="Where remote holders send their segments, e.g. tcp://0.0.0.0:7710.")
@click.option("--listen-pub", required=True, help="The agent's event endpoint, e.g. tcp://0.0.0.0:7711.")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--backend", type=click.Choice(["host", "cupy"]), default="host", show_default=True)
def agent(key_path: Path, keys_dir: Path, router: str, pub: str, listen_router: str, listen_pub: str, run_dir: Path, backend: str) -> None:
    """Run the device agent on the GPU host: remote holders stream ciphertext through it into device staging."""
    from gtbus.nodes.agent import HOLDERS_LOG, DeviceAgent
    from gtbus.nodes.runtime import NodeRuntime
    from gtbus.nodes.wiring import client_transport, orchestrator_of, server_transport

    identity = load_identity(key_path)
    private_dir(run_dir)  # logs, state and checkpoints: this user only
    roster = Roster.from_dir(keys_dir)

    async def main() -> None:
        up = NodeRuntime(identity, roster, client_transport(identity, roster, router, pub), run_dir=run_dir, server=orchestrator_of(roster))
        down = NodeRuntime(identity, roster, server_transport(identity, roster, listen_router, listen_pub), run_dir=run_dir,
                           log_name=identity.name + HOLDERS_LOG, heartbeat_interval=0)
        dev_cls = device_class(backend)
        await asyncio.to_thread(dev_cls.prepare_holder, 0)
        a = DeviceAgent(up, down, dev_cls)
        await down.start()
        await up.start()
        click.echo(f"device agent {identity.name}: holders connect to {down.transport.endpoints[0]}", err=True)
        try:
            await a.run()
            await asyncio.sleep(0.5)
        finally:
            await up.close()
            await down.close()

    asyncio.run(main())


@click.command()
@click.option("--backend", type=click.Choice(["host", "cupy"]), default="host", show_default=True)
@click.option("--trainer", "trainer_name", default="bytelm", show_default=True)
def measure(backend: str, trainer_name: str) -> None:
    """Print the code measurement holders pin (trainer, device backend, kernels, hop shell)."""
    from gtbus.gpu.code_measure import pin_value

    click.echo(pin_value(make_trainer(trainer_name), make_device(backend)).hex())


@click.command()
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), help="Default: runs/demo-<time>.")
@click.option("--holders", "n_holders", type=int, default=3, show_default=True)
@click.option("--mode", type=click.Choice(["travel", "ship"]), default="travel", show_default=True)
@click.option("--rounds", type=int, default=2, show_default=True)
@click.option("--kib-per-holder", type=int, default=384, show_default=True, help="Demo corpus size per holder.")
@click.option("--chunk-tokens", type=int, default=1 << 16, show_default=True)
@click.option("--steps", default="120", show_default=True, help="Training steps per hop, or 'pass'.")
@click.option("--gpus", type=click.IntRange(min=1, max=MAX_GPUS), default=1, show_default=True, help="GPU tokens travelling at once (emulated devices), their replicas merged in-process.")
@click.option("--merge-every", type=click.IntRange(min=0), default=0, show_default=True, help="Average the replicas every N trained hops (0: every --gpus hops).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def demo(run_dir: Path | None, n_holders: int, mode: str, rounds: int, kib_per_holder: int, chunk_tokens: int, steps: str, gpus: int, merge_every: int, as_json: bool) -> None:
    """An orchestrator and holders as separate processes on loopback, on the host backend."""
    from gtbus.nodes.launcher import LocalDeployment, LocalRun

    run = run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    say = (lambda s: click.echo(s, err=True)) if as_json else click.echo
    fleet = f", {gpus} GPU tokens" if gpus > 1 else ""
    say(f"demo run in {run}: orchestrator + {n_holders} holders as processes, mode {mode}, {rounds} rounds{fleet}; corpus: this Python's stdlib sources, split between holders")
    dep = LocalDeployment(LocalRun(run_dir=run, holders=n_holders, mode=mode, rounds=rounds, chunk_tokens=chunk_tokens, steps=steps,
                                   bytes_per_holder=kib_per_holder * 1024, gpus=gpus, merge_every=merge_every))
    summary = dep.run_to_end(say)
    samples = _demo_samples(run / "export")
    if as_json:
        for line in samples:
            say(line)
        click.echo(json.dumps(summary, indent=1))
        return
    click.echo("")
    rows = [
        ("hops", f"{summary['hops']} {summary['outcomes']}"),
        *([("GPU tokens", f"{summary['gpus']}: hops per GPU {summary['hops_per_gpu']}, {summary['merges']} merges ({summary['merge_s'] * 1e3:.1f} ms)")] if summary["gpus"] > 1 else []),
        ("loss (nats/byte)", f"{summary['first_loss']:.3f} -> {summary['last_loss']:.3f} on each hop's chunk before training on it"),
        ("bytes provisioned", f"{summary['bytes_provisioned']:,}"),
        *([("prepared ahead", f"{p['used']} of {summary['hops']} hops (params and staging at the holder before its grant; "
                              f"{p['discarded']} guesses wrong)")] if (p := summary.get("prepared_hops") or {}).get("made") else []),
        ("provision rate", f"{summary['provision_gbps'] * 1000:.1f} MB/s (encrypted, grant to plaintext on device)"),
        ("transfer share", f"{summary['transfer_share'] * 100:.3f} % of transfer + training time"),
        ("message logs", f"{summary['logs']}  (check: gtbus replay --verify {summary['logs']})"),
    ]
    for k, v in rows:
        click.echo(f"{k:<20}{v}")
    for line in samples:
        click.echo(line)


#: What the demo's models are asked to continue: the corpus is Python source.
DEMO_PROMPT = b"    def "


def _demo_samples(out: Path, n_bytes: int = 72, seed: int = 0) -> list[str]:
    """Export the run's final model to ``out``; lines showing it beside the untrained model, same prompt and seed."""
    from gtbus.export.model_files import export_model, load_export
    from gtbus.export.sample import generate, render

    run_dir = out.parent
    exported = export_model(run_dir, out)
    loaded = load_export(out)
    shown = {
        "trained": generate(loaded.trainer, DEMO_PROMPT, n_bytes, seed=seed),
        "untrained": generate(loaded.untrained(), DEMO_PROMPT, n_bytes, seed=seed),
    }
    prompt = render(DEMO_PROMPT, one_line=True)
    return [
        f"{'exported model':<20}{out}  ({', '.join(exported.files)}; try: gtbus sample {out} --prompt 'import ')",
        *(f"{'sample, ' + name:<20}{prompt}{render(text, one_line=True)}" for name, text in shown.items()),
    ]


COMMANDS = [orchestrator, holder, agent, measure, demo]
