"""The orchestrator node: owns the model on the device and sends the GPU token on its travels.

A hop, in the order the design gives (DESIGN §6):

1. provision: fresh staging buffer exported for this hop only; fresh channel
   key; the epoch is reserved on disk before the grant leaves; the grant
   carries the params sealed to the holder and a signed measurement report
   that commits to the key;
2. wait for the return (or decline, or lease expiry -> revoke);
3. revoke the staging export, authenticate and decrypt every segment into a
   private buffer, re-measure model and code (unchanged since the grant?),
   train;
4. epilogue: scrub both buffers, verify they read zero, release, drop the key,
   publish a signed hop record, checkpoint.

The decisions about the token are made by :class:`~gtbus.protocol.token.TokenMachine`
and :class:`~gtbus.protocol.schedule.Schedule`; this module is the asyncio
shell that performs them. Its parts, each in its own module: epochs reserved
on disk (:mod:`gtbus.nodes.epochs`), hop buffers (:mod:`gtbus.nodes.staging_pool`),
the checkpoint file (:mod:`gtbus.training.checkpoint`), the code measurement
(:mod:`gtbus.gpu.code_measure`) and the run summary (:mod:`gtbus.nodes.run_summary`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy

from gtbus.errors import ChannelError, ConfigError, DeviceError, GtbusError, TransportError
from gtbus.gpu.attestation import MeasurementReport, PlatformSigner, channel_key_commitment
from gtbus.gpu.channel import ChannelParams, SegmentContext, SegmentOpener, segment_bounds, segment_count, staging_size, TAG_SIZE
from gtbus.gpu.code_measure import code_measurement, first_change, loaded_code
from gtbus.gpu.device import Device
from gtbus.gpu.sealing import seal_bytes, seal_params
from gtbus.messages.identity import Role
from gtbus.messages.pipeline import Accepted
from gtbus.messages.types import (
    AgentReady,
    AgentStage,
    Echo,
    EchoReply,
    HopRecord,
    HopReport,
    MeasurementPublished,
    Refusal,
    Register,
    RunComplete,
    ShipSegment,
    Shutdown,
    Snapshot,
    SnapshotRequest,
    TokenAck,
    TokenDecline,
    TokenGrant,
    TokenReturn,
    TokenRevoke,
    TokenState,
    Welcome,
)
from gtbus.nodes.epochs import EpochReservation
from gtbus.nodes.run_summary import HopResult, hop_progress, hop_record, public_snapshot, public_summary, run_summary
from gtbus.nodes.runtime import NodeRuntime
from gtbus.nodes.staging_pool import StagingPool
from gtbus.private_files import private_dir
from gtbus.protocol.admission import AdmittedManifest, ManifestRefused, RunShape, admit
from gtbus.protocol.schedule import Assignment, Schedule
from gtbus.protocol.token import Phase, TokenMachine
from gtbus.training.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from gtbus.training.trainer import ONE_PASS, StepBudget, Trainer
from gtbus.transport.base import Delivery

TOKEN_BYTES = 2  # hop buffers carry uint16 tokens


@dataclass
class RunConfig:
    """How the orchestrator runs: schedule, hop sizes, leases, files."""

    run_dir: Path
    holders: list[str]
    rounds: int = 1
    chunk_tokens: int = 1 << 17
    mode: str = "travel"
    lease: float = 10.0
    segment_size: int = 4 << 20  # fewer, larger segments: less per-call overhead on the holder's cores
    suite: str = "aes-256-gcm"
    steps_per_hop: StepBudget = ONE_PASS
    register_timeout: float = 60.0
    max_attempts: int = 2
    resume: bool = False
    run_id: str = ""
    trainer: str = "bytelm"  # the workload's name, to name the remedy when data does not fit it
    # Most chunks one holder may bring: bounds every schedule, checkpoint and
    # table that a holder's manifest would otherwise size.
    max_chunks: int = 1 << 16
    # A holder that cannot be reached is retried after a backoff doubling from
    # backoff_min to backoff_max; when no holder with work left has been heard
    # from for absent_timeout seconds, the run stops with a named reason.
    backoff_min: float = 0.25
    backoff_max: float = 8.0
    absent_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.mode not in ("travel", "ship"):
            raise ConfigError(f"mode must be travel or ship, not {self.mode!r}")
        if self.chunk_tokens < 64:
            raise ConfigError("chunk_tokens must be at least 64")
        if self.lease <= 0:
            raise ConfigError("lease must be positive")
        if not 1 <= self.max_chunks <= 1 << 24:
            raise ConfigError("max_chunks must be between 1 and 16777216")
        if not 0 < self.backoff_min <= self.backoff_max:
            raise ConfigError("backoff_min must be positive and at most backoff_max")
        if self.absent_timeout <= 0:
            raise ConfigError("absent_timeout must be positive")

    @property
    def capacity(self) -> int:
        """Bytes of one hop buffer (a whole chunk of uint16 tokens)."""
        return self.chunk_tokens * TOKEN_BYTES

    @property
    def segment(self) -> int:
        """AEAD segment size of every hop."""
        return min(self.segment_size, max(self.capacity, 1 << 20))


class Orchestrator:
    """Runs the schedule: one hop at a time, each with a fresh buffer and key."""

    def __init__(
        self,
        runtime: NodeRuntime,
        device: Device,
        trainer: Trainer,
        platform: PlatformSigner,
        config: RunConfig,
        *,
        on_hop: Callable[[HopResult], None] | None = None,
        tamper_hook: Callable[["Orchestrator", Assignment], None] | None = None,
    ) -> None:
        self.rt = runtime
        self.device = device
        self.trainer = trainer
        self.platform = platform
        self.config = config
        self.on_hop = on_hop
        self.tamper_hook = tamper_hook  # failure injection for tests only
        self.log = logging.getLogger(f"gtbus.orchestrator.{runtime.name}")
        self.state_dir = private_dir(config.run_dir / "state" / runtime.name)
        self.checkpoint_path = config.run_dir / "checkpoints" / f"{runtime.name}.npz"
        self.run_id = config.run_id or os.urandom(6).hex()
        self.manifests: dict[str, AdmittedManifest] = {}
        self.via: dict[str, str] = {}  # remote holder -> the device agent it writes through
        self.agents: set[str] = set()
        self.registered = asyncio.Event()
        self.hops: list[HopResult] = []
        self.epochs = EpochReservation(self.state_dir / "epoch")
        self.token = TokenMachine(last_epoch=self.epochs.reserved_upto)
        self.schedule: Schedule | None = None
        self.code_hash = b""
        self.loaded_code: dict[str, bytes] = {}
        self._hop_event = asyncio.Event()
        self._return: Accepted | None = None
        self._decline: str | None = None
        # Ship mode: this hop's ciphertext lands in one buffer sized by the run's
        # capacity (never by a peer's claim); which segments arrived, by index.
        self._ship_buf: bytearray | None = None
        self._ship_got: set[int] = set()
        self._ship_expect: tuple[int, int] = (0, 0)  # (segments, bytes) the granted chunk must have
        # Holders that could not be reached: monotonic times of the last failure and of the
        # first failure since they were last reached, and the current backoff.
        self._away: dict[str, tuple[float, float, float]] = {}
        self._current_epoch = 0
        self.first_eval: float | None = None
        self.last_eval: float | None = None
        self.started = time.time()
        self.complete = False
        self._hop_started: float | None = None
        self.staging = StagingPool(device, self.state_dir, self.log)
        self.code_compromised: str | None = None
        # Observers that asked for a snapshot: they (and the hop's holder) get the per-hop metrics.
        self.followers: set[str] = set()
        rt = runtime
        rt.on(Register, self._on_register)
        rt.on(Echo, self._on_echo)
        rt.on(SnapshotRequest, self._on_snapshot_request)
        rt.on(TokenAck, self._on_ack)
        rt.on(TokenReturn, self._on_return)
        rt.on(TokenDecline, self._on_decline)
        rt.on(ShipSegment, self._on_ship_segment)

    # -- handlers ---------------------------------------------------------------------------

    def _report(self, key: bytes | None, epoch: int, model_hash: bytes | None = None) -> dict[str, Any]:
        if model_hash is None:
            model_hash = self.device.measure(*self.trainer.parameter_views())
        rep = MeasurementReport(
            code_hash=self.code_hash,
            model_hash=model_hash,
            device_id=self.device.device_id,
            key_commitment=channel_key_commitment(key if key is not None else b""),
            run_id=self.run_id,
            epoch=epoch,
            timestamp=float(time.time()),
        )
        return dict(self.platform.sign(rep).to_wire())

    async def _stage_on_agent(self, agent: str, token_id: str, epoch: int, holder: str, handle: str, staging: Any, seg: int) -> None:
        sealed = seal_bytes(handle.encode(), self.rt.roster[agent].x25519)
        try:
            acc = await self.rt.request(AgentStage(token_id, holder, sealed, staging.nbytes, seg), agent, timeout=self.config.lease, epoch=epoch)
        except asyncio.TimeoutError:
            raise TransportError(f"device agent {agent} did not answer the stage") from None
        if not isinstance(acc.message, AgentReady) or acc.message.token_id != token_id:
            raise TransportError(f"device agent {agent} refused the stage: {getattr(acc.message, 'reason', acc.spec.name)}")

    async def _on_register(self, acc: Accepted, delivery: Delivery) -> None:
        sender = acc.header.sender
        member = self.rt.roster.get(sender)
        if member is not None and member.role is Role.AGENT:
            self.agents.add(sender)
            await self.rt.send(Welcome(self.run_id, self._report(None, self.token.epoch), self._schedule_info()), sender, parent=acc.header.id)
            self.log.info("device agent %s registered", sender)
            self._check_registered()
            return
        if member is None or member.role is not Role.HOLDER or sender not in self.config.holders:
            await self.rt.send(Refusal("not-a-holder", f"{sender} is not a holder of this run"), sender, parent=acc.header.id)
            return
        try:
            m = admit(acc.message.manifest, self._run_shape(), previous=self.manifests.get(sender) if self.schedule is not None else None)
        except ManifestRefused as exc:
            self.rt.note_refused(exc.code, sender)
            self.log.warning("refused the registration of %s: %s", sender, exc)
            await self.rt.send(Refusal(exc.code, str(exc)), sender, parent=acc.header.id)
            return
        if self.schedule is not None and self.schedule.chunks.get(sender, m.chunk_count) != m.chunk_count:
            await self.rt.send(Refusal("manifest-changed", "other data than this run was scheduled with; start a new run for new data"), sender, parent=acc.header.id)
            return
        via = m.via
        if via is not None and (via not in self.rt.roster or self.rt.roster[via].role is not Role.AGENT):
            await self.rt.send(Refusal("bad-manifest", "'via' is not a device agent of this deployment"), sender, parent=acc.header.id)
            return
        if via is not None:
            self.via[sender] = via
        self.manifests[sender] = m
        self._away.pop(sender, None)
        await self.rt.send(
            Welcome(self.run_id, self._report(None, self.token.epoch), self._schedule_info()),
            sender,
            parent=acc.header.id,
        )
        self.log.info("registered %s: %d chunks", sender, m.chunk_count)
        self._check_registered()

    def _run_shape(self) -> RunShape:
        cfg = self.config
        return RunShape(cfg.chunk_tokens, cfg.max_chunks, int(self.trainer.vocab), cfg.trainer)

    def _check_registered(self) -> None:
        # Every holder is in, and every agent a remote holder writes through.
        if all(h in self.manifests for h in self.config.holders) and set(self.via.values()) <= self.agents:
            self.registered.set()

    def _schedule_info(self) -> dict[str, Any]:
        return {
            "rounds": self.config.rounds,
            "chunk_tokens": self.config.chunk_tokens,
            "mode": self.config.mode,
            "suite": self.config.suite,
            "segment_size": self.config.segment_size,
        }

    async def _on_echo(self, acc: Accepted, delivery: Delivery) -> None:
        await self.rt.send(EchoReply(acc.message.payload, acc.message.note), acc.header.sender, parent=acc.header.id)

    def snapshot_state(self, *, metrics: bool = True) -> dict[str, Any]:
        """Everything a late joiner or `gtbus status` needs to know now (``metrics=False``: the public part, for holders)."""
        state = {
            "run_id": self.run_id,
            "token": {"id": self.token.token_id, "owner": self.token.owner or self.rt.name, "epoch": self.token.epoch, "phase": self.token.phase.value},
            "holders": sorted(self.manifests),
            "liveness": self.rt.liveness(),
            **hop_progress(self.hops),
            "last_loss": self.last_eval,
            "round": self.schedule.round if self.schedule else 0,
            "rounds": self.config.rounds,
            "hops_total": self.config.rounds * sum(m.chunk_count for m in self.manifests.values()),
            "hop_started": self._hop_started,
            "started": self.started,
            "complete": self.complete,
        }
        return state if metrics else public_snapshot(state)

    async def _on_snapshot_request(self, acc: Accepted, delivery: Delivery) -> None:
        seq = self.rt.signer._seq.get("*", 0)
        observer = self.rt.roster[acc.header.sender].role is Role.OBSERVER
        if observer and len(self.followers) < 64:  # bounded: at most a handful of observer keys exist
            self.followers.add(acc.header.sender)
        await self.rt.send(Snapshot(self.snapshot_state(metrics=observer), seq), acc.header.sender, parent=acc.header.id)

    async def _tell(self, msg: object, to: list[str], *, epoch: int = 0) -> None:
        """Send ``msg`` directly to each of ``to`` that is connected; an observer that is gone stops following."""
        for name in dict.fromkeys(to):
            try:
                await self.rt.send(msg, name, epoch=epoch)
            except TransportError:
                self.followers.discard(name)

    async def _publish_hop(self, out: HopResult) -> None:
        """Everyone learns the hop's public line; its holder and the observers learn its metrics."""
        record, public = hop_record(out)
        await self.rt.publish(HopRecord(out.epoch, out.holder, out.chunk, out.outcome, public), epoch=out.epoch)
        await self._tell(HopReport(out.epoch, out.holder, out.chunk, out.outcome, record), [out.holder, *sorted(self.followers)], epoch=out.epoch)

    def _token_message(self, acc: Accepted) -> tuple[str, int, str]:
        return acc.header.sender, acc.header.epoch, acc.message.token_id

    async def _on_ack(self, acc: Accepted, delivery: Delivery) -> None:
        v = self.token.on_ack(*self._token_message(acc))
        if not v.accepted:
            self.log.info("ignored ack from %s: %s", acc.header.sender, v.reason)

    async def _on_return(self, acc: Accepted, delivery: Delivery) -> None:
        v = self.token.on_return(*self._token_message(acc))
        if not v.accepted:
            self.log.warning("ignored return from %s: %s", acc.header.sender, v.reason)
            return
        self._return = acc
        self._hop_event.set()

    async def _on_decline(self, acc: Accepted, delivery: Delivery) -> None:
        v = self.token.on_decline(*self._token_message(acc))
        if not v.accepted:
            return
        self._decline = acc.message.reason
        self._hop_event.set()

    async def _on_ship_segment(self, acc: Accepted, delivery: Delivery) -> None:
        sender, epoch, token_id = self._token_message(acc)
        why = self._ship_segment_misfit(acc, sender, epoch, token_id)
        if why is not None:
            self.rt.note_refused(why, sender)
            return
        seg: ShipSegment = acc.message
        stride = self.config.segment + TAG_SIZE
        assert self._ship_buf is not None
        self._ship_buf[seg.index * stride : seg.index * stride + len(acc.blobs[0])] = acc.blobs[0]
        self._ship_got.add(seg.index)

    def _ship_segment_misfit(self, acc: Accepted, sender: str, epoch: int, token_id: str) -> str | None:
        # Every number in a ship.segment is checked against what this hop's grant
        # fixed (mode, holder, epoch, the chunk's segment count and sizes) before a
        # byte is stored: nothing a holder claims sizes anything.
        if self.config.mode != "ship" or self._ship_buf is None:
            return "ship-segment-outside-a-ship-hop"
        if sender != self.token.owner or epoch != self.token.epoch or token_id != self.token.token_id:
            return "ship-segment-of-another-hop"
        if self.token.phase not in (Phase.GRANTED, Phase.HELD):
            return "ship-segment-after-the-return"
        seg = acc.message
        count, nbytes = self._ship_expect
        if type(seg.index) is not int or type(seg.count) is not int or seg.count != count or not 0 <= seg.index < count:
            return "ship-segment-index-or-count-out-of-range"
        if seg.index in self._ship_got:
            return "ship-segment-duplicate"
        _, _, n = segment_bounds(seg.index, nbytes, self.config.segment)
        if len(acc.blobs) != 1 or memoryview(acc.blobs[0]).nbytes != n + TAG_SIZE:
            return "ship-segment-wrong-size"
        return None

    # -- the run ------------------------------------------------------------------------------

    async def setup(self) -> None:
        """Load the model, measure it, resume from a checkpoint if asked, publish the measurement."""
        self.staging.discard_inflight()
        self.trainer.load(self.device.array_module)
        self.code_hash = code_measurement(self.trainer, self.device)
        self.loaded_code = loaded_code(self.trainer, self.device)
        if self.config.resume:
            self._load_checkpoint()
        await self.rt.publish(MeasurementPublished(self._report(None, self.token.epoch)))

    async def wait_for_holders(self) -> None:
        """Wait until every configured holder registered (ConfigError naming the missing ones)."""
        try:
            await asyncio.wait_for(self.registered.wait(), self.config.register_timeout)
        except asyncio.TimeoutError:
            missing = sorted(set(self.config.holders) - set(self.manifests)) + sorted(set(self.via.values()) - self.agents)
            raise GtbusError(f"nodes did not register within {self.config.register_timeout:.0f}s: {', '.join(missing)}") from None

    async def run(self) -> dict[str, Any]:
        """Setup, wait for holders, run every hop of the schedule; return the summary."""
        await self.setup()
        self.rt.state_label = "waiting-for-holders"
        await self.wait_for_holders()
        self.rt.state_label = "running"
        if self.schedule is None:
            self.schedule = Schedule(
                {h: self.manifests[h].chunk_count for h in self.config.holders},
                self.config.rounds,
                max_attempts=self.config.max_attempts,
            )
        self._eval_tokens = None
        while True:
            a = self.schedule.next(self._reachable)
            if a is None:
                if self.schedule.finished:
                    break
                await self._wait_for_a_holder()
                continue
            outcome = await self.hop(a)
            if outcome.outcome != "undelivered":
                self._away.pop(a.holder, None)
            if outcome.outcome == "trained":
                self.schedule.complete(a)
            elif outcome.outcome == "undelivered":
                self.schedule.defer(a)
                self._back_off(a.holder)
                outcome.detail += " (deferred: retried when the holder is back)"
            else:
                retry = self.schedule.fail(a)
                outcome.detail += " (will retry)" if retry else " (skipped this round)"
            self.hops.append(outcome)
            self._save_checkpoint()
            await self._publish_hop(outcome)
            if self.on_hop:
                self.on_hop(outcome)
            if self.code_compromised is not None:
                # A checkpoint restores the model, not the code: nothing more is trained by this process.
                reason = f"loaded code changed during hop {outcome.epoch} ({self.code_compromised}); the run stops"
                await self.rt.publish(Shutdown(reason))
                raise GtbusError(reason)
        self.staging.release_spares()
        summary = self.summary()
        self.complete = True
        self.rt.state_label = "complete"
        await self._tell(RunComplete(summary), sorted(self.followers))
        await self.rt.publish(RunComplete(public_summary(summary)))
        await self.rt.publish(Shutdown("run complete"))
        return summary

    # -- liveness -----------------------------------------------------------------------------

    def _reachable(self, holder: str) -> bool:
        """May ``holder`` be granted now? Not while it backs off after an undelivered grant,
        unless it was heard from since (it reconnected)."""
        away = self._away.get(holder)
        if away is None:
            return True
        failed_at, _, backoff = away
        now = self.rt.clock.monotonic()
        heard_since = self.rt.last_heard.get(holder, -1.0) > failed_at
        return now >= failed_at + backoff or (heard_since and now >= failed_at + self.config.backoff_min)

    def _back_off(self, holder: str) -> None:
        cfg = self.config
        previous = self._away.get(holder)
        now = self.rt.clock.monotonic()
        if previous is None:
            self._away[holder] = (now, now, cfg.backoff_min)
        else:
            self._away[holder] = (now, previous[1], min(previous[2] * 2, cfg.backoff_max))

    def _gone(self, holder: str) -> bool:
        """Unreachable, and not heard from, for ``absent_timeout`` seconds."""
        away = self._away.get(holder)
        if away is None:
            return False
        quiet_since = max(away[1], self.rt.last_heard.get(holder, -1.0))
        return self.rt.clock.monotonic() - quiet_since >= self.config.absent_timeout

    async def _wait_for_a_holder(self) -> None:
        """Only holders that cannot be reached have work left: wait for one, bounded.

        A holder away for ``absent_timeout`` loses its chunks for this round (skipped
        and reported; later rounds try it again). If no holder of the run at all has
        been heard from for that long, the run stops with the reason (resumable)
        instead of skipping its way through the schedule.
        """
        assert self.schedule is not None
        waiting = self.schedule.pending_holders()
        self.rt.state_label = "waiting-for-holders"
        self.log.warning("no holder with work left can be reached (%s); waiting up to %.0fs", ", ".join(waiting), self.config.absent_timeout)
        clock, timeout = self.rt.clock, self.config.absent_timeout
        while not any(self._reachable(h) for h in waiting):
            if all(self._gone(h) for h in waiting):
                heard = [h for h in self.config.holders if clock.monotonic() - self.rt.last_heard.get(h, -timeout) < timeout]
                if not heard:
                    reason = f"no holder was reachable for {timeout:.0f}s ({', '.join(waiting)} have work left); the run stops here and continues with --resume"
                    self._save_checkpoint()
                    await self.rt.publish(Shutdown(reason))
                    raise GtbusError(reason)
                for h in waiting:
                    skipped = self.schedule.give_up(h)
                    self.log.warning("%s unreachable for %.0fs: skipped its %d remaining chunks of round %d", h, timeout, len(skipped), self.schedule.round)
                break
            await asyncio.sleep(min(0.05, self.config.backoff_min))
        self.rt.state_label = "running"

    async def _publish_state(self) -> None:
        t = self.token
        await self.rt.publish(TokenState(t.token_id, t.owner or self.rt.name, t.epoch, t.phase.value), epoch=t.epoch)

    async def hop(self, a: Assignment) -> HopResult:
        """One complete hop for assignment ``a``; never raises for a holder's misbehaviour."""
        cfg = self.config
        capacity, seg = cfg.capacity, cfg.segment
        # What the granted chunk must come back as, from the admitted manifest:
        # a return claiming anything else is refused before it sizes any work.
        expect_bytes = self.manifests[a.holder].chunk_tokens_of(a.chunk, cfg.chunk_tokens) * TOKEN_BYTES
        expect = (segment_count(expect_bytes, seg), expect_bytes)
        t0 = time.perf_counter()
        staging, handle = (None, "ship") if cfg.mode == "ship" else self.staging.take_staging(staging_size(capacity, seg))
        data = self.staging.take_private(capacity)
        params = ChannelParams.generate(str(handle), capacity, suite=cfg.suite, segment_size=seg)
        grant = self.token.grant(a.holder, time.time(), cfg.lease)
        self._hop_started = time.time()
        self.epochs.reserve(grant.epoch)
        self.rt.guard.raise_fence(grant.epoch)
        out = HopResult(grant.epoch, a.round, a.holder, a.chunk, cfg.mode, "pending")
        self._return, self._decline = None, None
        if cfg.mode == "ship":
            if self._ship_buf is None:
                self._ship_buf = bytearray(staging_size(capacity, seg))
            self._ship_got, self._ship_expect = set(), expect
        self._hop_event.clear()
        model_before = self.device.measure(*self.trainer.parameter_views())
        revoked = False
        try:
            holder_pub = self.rt.roster[a.holder].x25519
            msg = TokenGrant(
                token_id=grant.token_id,
                run_id=self.run_id,
                holder=a.holder,
                chunk_index=a.chunk,
                mode=cfg.mode,
                lease_deadline=grant.deadline,
                sealed_params=seal_params(params, holder_pub),
                report=self._report(params.key, grant.epoch, model_before),
            )
            try:
                via = self.via.get(a.holder) if cfg.mode == "travel" else None
                if via is not None:
                    # A remote holder writes through the device agent on this host:
                    # the agent must hold the staging mapping before the holder streams.
                    await self._stage_on_agent(via, grant.token_id, grant.epoch, a.holder, str(handle), staging, seg)
                await self.rt.send(msg, a.holder, epoch=grant.epoch)
            except TransportError as exc:
                # The holder is not connected (killed, partitioned, reconnecting): take
                # the token back now; the run loop defers the chunk and backs off.
                out.outcome, out.detail = "undelivered", f"grant not delivered: {exc}"
                self.log.warning("hop %d: %s", grant.epoch, out.detail)
                self.token.revoke()
                return out
            await self._publish_state()
            returned = await self._await_return(grant.deadline)
            out.provision_s = time.perf_counter() - t0
            if returned is None:
                out.outcome = "declined" if self._decline is not None else "revoked"
                out.detail = self._decline or "lease expired before the return"
                await self._revoke(grant.token_id, grant.epoch, a.holder, out.detail)
                return out
            if self.tamper_hook:
                self.tamper_hook(self, a)
            ret: TokenReturn = returned.message
            out.nbytes, out.segments = ret.nbytes, ret.segments
            t1 = time.perf_counter()
            try:
                if ret.chunk_index != a.chunk:
                    raise ChannelError(f"returned chunk {ret.chunk_index}, granted chunk {a.chunk}")
                if (ret.segments, ret.nbytes) != expect:
                    raise ChannelError(
                        f"returned {ret.nbytes} bytes in {ret.segments} segments; chunk {a.chunk} is {expect[1]} bytes in {expect[0]} segments"
                    )
                ctx = SegmentContext(self.run_id, grant.epoch, a.holder, ret.segments)
                if cfg.mode == "travel":
                    assert staging is not None
                    # Plaintext lands in a private buffer that was never exported; then the
                    # staging export is revoked so no handle of this hop maps again.
                    try:
                        self.device.open_segments(staging, data, params, ctx, ret.segments, ret.nbytes)
                    finally:
                        self._scrub(staging)
                        self.device.revoke_staging(staging)
                        revoked = True
                else:
                    self._open_shipped(params, ctx, ret, data)
            except (ChannelError, DeviceError) as exc:
                out.outcome, out.detail = "rejected", f"segments refused: {exc}"
                self.log.warning("hop %d from %s: %s", grant.epoch, a.holder, out.detail)
                self.token.revoke()
                return out
            out.open_s = time.perf_counter() - t1
            model_now = self.device.measure(*self.trainer.parameter_views())
            code_changed = first_change(self.loaded_code, loaded_code(self.trainer, self.device))
            if not hmac.compare_digest(model_now, model_before) or code_changed is not None:
                what = "model" if model_now != model_before else f"code ({code_changed})"
                if code_changed is not None:
                    self.code_compromised = code_changed
                out.outcome, out.detail = "rolled-back", f"{what} changed during the hop; restored the last checkpoint"
                self.log.error("hop %d: %s", grant.epoch, out.detail)
                self.token.revoke()
                self._restore_model()
                return out
            tokens = self.device.as_array(data, numpy.uint16)[: ret.nbytes // TOKEN_BYTES]
            # While this hop trains, the next hop's fresh staging is allocated beside it.
            self.staging.prepare_next(staging_size(capacity, seg) if cfg.mode == "travel" else 0)
            try:
                t2 = time.perf_counter()
                out.eval_before = self.trainer.evaluate(tokens)
                t3 = time.perf_counter()
                report = self.trainer.train_on(tokens, cfg.steps_per_hop)
                t4 = time.perf_counter()
                out.eval_after = self.trainer.evaluate(tokens)
                t5 = time.perf_counter()
            except GtbusError as exc:
                out.outcome, out.detail = "rejected", f"training refused the buffer: {exc}"
                self.token.revoke()
                self._restore_model()
                return out
            out.train_s = t4 - t3
            out.eval_s = (t3 - t2) + (t5 - t4)
            out.loss_first, out.loss_last = report.loss_first, report.loss_last
            if self.first_eval is None:
                self.first_eval = out.eval_before
            self.last_eval = out.eval_before
            out.outcome = "trained"
            return out
        finally:
            via = self.via.get(a.holder) if cfg.mode == "travel" else None
            if via is not None and out.outcome in ("pending", "revoked", "declined", "undelivered"):
                # The agent may still hold this hop's mapping: it must drop it before the staging goes.
                try:
                    await self.rt.send(TokenRevoke(grant.token_id, out.detail or "hop ended"), via, epoch=grant.epoch)
                except GtbusError as exc:
                    self.log.info("revoke not delivered to agent %s: %s", via, exc)
            t3 = time.perf_counter()
            self._epilogue(None if revoked else staging, data, params)
            if revoked:
                self.device.release(staging)
            if staging is not None:
                self.staging.track_export(str(handle), False)
            out.epilogue_s = time.perf_counter() - t3
            if self.token.phase in (Phase.GRANTED, Phase.HELD):
                # Unwinding (cancelled: shutdown, Ctrl-C) while a holder has the token:
                # take it back before finishing, so the real error is not masked.
                self.token.revoke()
            if self.token.phase is not Phase.IDLE:
                self.token.finish()
            await self._publish_state()

    async def _await_return(self, deadline: float) -> Accepted | None:
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                self.token.expired(time.time())
                return None
            try:
                await asyncio.wait_for(self._hop_event.wait(), remaining)
            except asyncio.TimeoutError:
                continue
            if self._decline is not None:
                return None
            return self._return

    async def _revoke(self, token_id: str, epoch: int, holder: str, reason: str) -> None:
        if self.token.phase in (Phase.GRANTED, Phase.HELD):
            self.token.revoke()
        try:
            await self.rt.send(TokenRevoke(token_id, reason), holder, epoch=epoch)
        except GtbusError as exc:  # the holder may be dead: that is why we revoke
            self.log.info("revoke not delivered to %s: %s", holder, exc)

    def _open_shipped(self, params: ChannelParams, ctx: SegmentContext, ret: TokenReturn, data: Any) -> None:
        # Conventional path: ciphertext arrived over the network into host memory;
        # it is decrypted on the CPU into host memory, then copied to the device.
        staging = self._ship_buf
        assert staging is not None
        try:
            if len(self._ship_got) != ret.segments:
                raise ChannelError(f"received {len(self._ship_got)} of {ret.segments} shipped segments")
            plain = numpy.zeros(params.capacity, dtype=numpy.uint8)
            try:
                SegmentOpener(params).open_into(staging, plain, ctx, ret.segments, ret.nbytes)
                view = self.device.as_array(data, numpy.uint8)
                view[: ret.nbytes] = self.device.array_module.asarray(plain[: ret.nbytes])
            finally:
                plain.fill(0)
        finally:
            numpy.frombuffer(staging, dtype=numpy.uint8).fill(0)
            self._ship_got = set()

    def _scrub(self, buf: Any) -> None:
        self.device.scrub(buf)
        if not self.device.verify_zero(buf):
            raise DeviceError("hop buffer did not read zero after scrub")

    def _epilogue(self, staging: Any, data: Any, params: ChannelParams) -> None:
        if staging is not None:
            try:
                self._scrub(staging)
            finally:
                self.device.release(staging)
        # The private buffer was never exported: once scrubbed and verified zero it
        # serves the next hop (a fresh one costs a page fault per 4 KiB on the host).
        try:
            self._scrub(data)
        except DeviceError:
            self.device.release(data)
            raise
        self.staging.keep_private(data)
        del params  # the key goes with the params object; nothing else holds it

    # -- checkpoints --------------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        ckpt = Checkpoint.of_trainer_state(
            self.trainer.state_dict(),
            run_id=self.run_id,
            epoch=self.token.epoch,
            schedule=self.schedule.to_state() if self.schedule else None,
            hops=[asdict(h) for h in self.hops],
            first_eval=self.first_eval,
            last_eval=self.last_eval,
        )
        write_checkpoint(self.checkpoint_path, ckpt)

    def _load_checkpoint(self) -> None:
        ckpt = read_checkpoint(self.checkpoint_path)
        self.trainer.load_state_dict(ckpt.trainer_state())
        self.run_id = ckpt.run_id
        self.schedule = Schedule.from_state(ckpt.schedule) if ckpt.schedule else None
        self.hops = [HopResult(**h) for h in ckpt.hops]
        self.first_eval, self.last_eval = ckpt.first_eval, ckpt.last_eval
        # Never reuse an epoch: continue above both the checkpoint and every reservation.
        self.token.epoch = max(self.token.epoch, self.epochs.resume_from(ckpt.epoch))
        self.log.info("resumed run %s at epoch %d", self.run_id, self.token.epoch)

    def _restore_model(self) -> None:
        if self.checkpoint_path.exists():
            self.trainer.load_state_dict(read_checkpoint(self.checkpoint_path).trainer_state())
        else:
            self.trainer.load(self.device.array_module)

    # -- reporting ----------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The run's numbers (what `gtbus demo --json` prints)."""
        return run_summary(
            self.hops,
            run_id=self.run_id,
            mode=self.config.mode,
            device=self.device.device_id,
            first_eval=self.first_eval,
            last_eval=self.last_eval,
            last_epoch=self.token.epoch,
            skipped=self.schedule.skipped if self.schedule else [],
            logs=str(self.config.run_dir / "logs"),
            checkpoint=str(self.checkpoint_path),
        )
