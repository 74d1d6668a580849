"""The orchestrator node: owns the model on the device and sends the GPU token on its travels.

A hop, in the order the design gives (DESIGN §6):

1. provision: fresh staging buffer exported for this hop only; fresh channel
   key; the epoch is reserved on disk before the grant leaves; the grant
   carries the params sealed to the holder and a signed measurement report
   that commits to the key;
2. wait for the return (or decline, or lease expiry -> revoke);
3. authenticate and decrypt every segment into a private buffer, re-measure
   model and code (unchanged since the grant?), train;
4. epilogue: scrub both buffers, verify they read zero, revoke the staging
   export and release, drop the key, publish a signed hop record, checkpoint.

The decisions are made by sans-I/O machines: each hop by a
:class:`~gtbus.protocol.hop.HopMachine` (which drives the run's
:class:`~gtbus.protocol.token.TokenMachine`), executed on the device by
:class:`~gtbus.nodes.hop_runner.HopRunner`; which hop comes next by the
:class:`~gtbus.protocol.schedule.Schedule`. This module is the asyncio shell
around them: registration, the run loop, liveness, and the run-level actions
a hop ends with (settle, checkpoint, publish, stop). Its parts, each in its own module: epochs reserved
on disk (:mod:`gtbus.nodes.epochs`), hop buffers (:mod:`gtbus.nodes.staging_pool`),
the checkpoint file (:mod:`gtbus.training.checkpoint`), the code measurement
(:mod:`gtbus.gpu.code_measure`) and the run summary (:mod:`gtbus.nodes.run_summary`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Awaitable, Callable

from gtbus.errors import GtbusError
from gtbus.gpu.attestation import MeasurementReport, PlatformSigner, channel_key_commitment
from gtbus.gpu.channel import staging_size
from gtbus.gpu.bounce import BounceSet
from gtbus.gpu.code_measure import code_measurement, loaded_code
from gtbus.gpu.device import Device
from gtbus.messages.identity import Role
from gtbus.messages.pipeline import Accepted
from gtbus.messages.types import (
    Echo,
    EchoReply,
    MeasurementPublished,
    Refusal,
    Register,
    ShipSegment,
    Shutdown,
    SnapshotRequest,
    TokenAck,
    TokenDecline,
    TokenReturn,
    TokenState,
    Welcome,
)
from gtbus.nodes.epochs import EpochReservation
from gtbus.nodes.hop_runner import HopRunner
from gtbus.nodes.run_checkpoint import resume_run, run_checkpoint
from gtbus.nodes.run_config import RunConfig
from gtbus.nodes.bulletin import Bulletin
from gtbus.nodes.run_summary import HopResult, hop_progress, run_summary
from gtbus.nodes.runtime import NodeRuntime
from gtbus.nodes.staging_pool import StagingPool
from gtbus.private_files import private_dir
from gtbus.protocol.enrolment import Enrolment, Refused
from gtbus.protocol.schedule import Assignment, Schedule
from gtbus.protocol.hop import Acked, Declined, HopEvent, PublishRecord, Returned, SegmentShipped, Settle, Settlement, StopRun
from gtbus.protocol.hop import Checkpoint as SaveCheckpoint
from gtbus.protocol.liveness import HolderLiveness, WhileAway
from gtbus.protocol.token import TokenMachine, Verdict
from gtbus.training.checkpoint import read_checkpoint, write_checkpoint
from gtbus.training.trainer import Trainer
from gtbus.transport.base import Delivery


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
        self.enrolment = Enrolment(config.holders)
        self.datasets: dict[str, list[Any]] = {}  # from the checkpoint resumed, if any
        # The enrolment's own tables, by their old names: manifests, remote holder -> its device agent, agents in.
        self.manifests, self.via, self.agents = self.enrolment.manifests, self.enrolment.via, self.enrolment.agents
        self.registered = asyncio.Event()
        self.hops: list[HopResult] = []
        self.epochs = EpochReservation(self.state_dir / "epoch")
        self.token = TokenMachine(last_epoch=self.epochs.reserved_upto)
        self.schedule: Schedule | None = None
        self.code_hash = b""
        self.loaded_code: dict[str, bytes] = {}
        self.current: HopRunner | None = None  # the hop in progress, or the last one
        self.ship_buf: BounceSet | None = None  # ship mode: the decrypting threads' bounce buffers, sized by the run
        self._after_hop: dict[type, Callable[[Any, Assignment, HopResult], Awaitable[None]]] = {
            Settle: self._settle,
            SaveCheckpoint: self._checkpoint,
            PublishRecord: self._publish_record,
            StopRun: self._stop_run,
        }
        self.liveness = HolderLiveness(config.backoff_min, config.backoff_max, config.absent_timeout)
        self.first_eval: float | None = None
        self.last_eval: float | None = None
        self.started = time.time()
        self.complete = False
        self.hop_started: float | None = None
        self.staging = StagingPool(device, self.state_dir, self.log)
        self.bulletin = Bulletin(runtime, self.snapshot_state)  # who learns what of the run
        rt = runtime
        rt.on(Register, self._on_register)
        self.refusals: dict[str, str] = {}  # holder -> why it refused this orchestrator's measurement (it left the run)
        rt.on(Refusal, self._on_refusal)
        rt.on(Echo, self._on_echo)
        rt.on(SnapshotRequest, self._on_snapshot_request)
        rt.on(TokenAck, self._on_ack)
        rt.on(TokenReturn, self._on_return)
        rt.on(TokenDecline, self._on_decline)
        rt.on(ShipSegment, self._on_ship_segment)

    # -- handlers ---------------------------------------------------------------------------

    def report(self, key: bytes | None, epoch: int, model_hash: bytes | None = None) -> dict[str, Any]:
        """A signed measurement report (code, model, device) committing to the channel ``key``, as wire data."""
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

    async def _on_register(self, acc: Accepted[Register], delivery: Delivery) -> None:
        sender = acc.header.sender
        member = self.rt.roster.get(sender)
        scheduled = self.schedule.chunks if self.schedule is not None else None
        agents = {m.name for m in self.rt.roster if m.role is Role.AGENT}
        decision = self.enrolment.register(sender, member.role if member else None, acc.message.manifest, self.config.shape(int(self.trainer.vocab)), scheduled=scheduled, agents=agents)
        if isinstance(decision, Refused):
            self.rt.note_refused(decision.code, sender)
            self.log.warning("refused the registration of %s: %s", sender, decision.reason)
            await self.rt.send(Refusal(decision.code, decision.reason), sender, parent=acc.header.id)
            return
        self.liveness.reached(sender)
        await self.rt.send(Welcome(self.run_id, self.report(None, self.token.epoch), self.config.announcement()), sender, parent=acc.header.id)
        m = decision.manifest
        self.log.info("registered %s: %s", sender, f"{m.chunk_count} chunks" if m else "device agent")
        if self.enrolment.complete:
            self.registered.set()

    async def _on_echo(self, acc: Accepted[Echo], delivery: Delivery) -> None:
        await self.rt.send(EchoReply(acc.message.payload, acc.message.note), acc.header.sender, parent=acc.header.id)

    def snapshot_state(self) -> dict[str, Any]:
        """Everything a late joiner or `gtbus status` needs to know now (:class:`Bulletin` decides who sees what)."""
        return {
            "run_id": self.run_id,
            "token": {"id": self.token.token_id, "owner": self.token.owner or self.rt.name, "epoch": self.token.epoch, "phase": self.token.phase.value},
            "holders": sorted(self.manifests),
            "liveness": self.rt.liveness(),
            **hop_progress(self.hops),
            "last_loss": self.last_eval,
            "round": self.schedule.round if self.schedule else 0,
            "rounds": self.config.rounds,
            "hops_total": self.config.rounds * sum(m.chunk_count for m in self.manifests.values()),
            "hop_started": self.hop_started,
            "started": self.started,
            "complete": self.complete,
        }

    async def _on_refusal(self, acc: Accepted[Refusal], delivery: Delivery) -> None:
        # A holder whose pin does not match our measurement leaves the run (it can only withdraw itself).
        h, m = acc.header.sender, acc.message
        if h in self.config.holders and m.code == "measurement-refused" and h not in self.refusals:
            self.refusals[h] = str(m.reason)[:300]
            self.log.error("%s refused this orchestrator's code measurement and left the run: %s", h, self.refusals[h])

    async def _on_snapshot_request(self, acc: Accepted[SnapshotRequest], delivery: Delivery) -> None:
        await self.bulletin.answer_snapshot(acc.header.sender, acc.header.id)

    def _feed(self, event: HopEvent) -> Verdict:
        # Between hops the last hop's machine judges (through the token): never a new decision.
        return self.current.feed(event).verdict if self.current is not None else Verdict(False, "no hop yet")

    async def _on_ack(self, acc: Accepted[TokenAck], delivery: Delivery) -> None:
        h = acc.header
        v = self._feed(Acked(h.sender, h.epoch, acc.message.token_id))
        if not v.accepted:
            self.log.info("ignored ack from %s: %s", h.sender, v.reason)

    async def _on_return(self, acc: Accepted[TokenReturn], delivery: Delivery) -> None:
        h, m = acc.header, acc.message
        v = self._feed(Returned(h.sender, h.epoch, m.token_id, m.chunk_index, m.segments, m.nbytes))
        if not v.accepted:
            self.log.warning("ignored return from %s: %s", h.sender, v.reason)

    async def _on_decline(self, acc: Accepted[TokenDecline], delivery: Delivery) -> None:
        h = acc.header
        v = self._feed(Declined(h.sender, h.epoch, acc.message.token_id, acc.message.reason))
        if not v.accepted:
            self.log.info("ignored decline from %s: %s", h.sender, v.reason)

    async def _on_ship_segment(self, acc: Accepted[ShipSegment], delivery: Delivery) -> None:
        h, m = acc.header, acc.message
        size = memoryview(acc.blobs[0]).nbytes if len(acc.blobs) == 1 else -1
        v = self._feed(SegmentShipped(h.sender, h.epoch, m.token_id, m.index, m.count, size))
        if not v.accepted:
            self.rt.note_refused(v.reason if v.reason.startswith("ship-segment-") else "ship-segment-outside-a-ship-hop", h.sender)
            return
        assert self.current is not None
        self.current.store_shipped(m.index, acc.blobs[0])

    # -- the run ------------------------------------------------------------------------------

    async def setup(self) -> None:
        """Load the model, measure it, resume from a checkpoint if asked, publish the measurement."""
        self.staging.discard_inflight()
        self.trainer.load(self.device.array_module)
        self.code_hash = code_measurement(self.trainer, self.device)
        self.loaded_code = loaded_code(self.trainer, self.device)
        if self.config.resume:
            self._load_checkpoint()
        # The first hop's buffers are made now, while holders register, as every
        # later hop's are made while the hop before it trains (no grant names them yet).
        cfg = self.config
        self.staging.prepare_private(cfg.capacity)
        if cfg.mode == "travel":
            self.staging.prepare_next(staging_size(cfg.capacity, cfg.segment))
        await self.rt.publish(MeasurementPublished(self.report(None, self.token.epoch)))

    async def wait_for_holders(self) -> None:
        """Wait until every configured holder registered (ConfigError naming the missing ones)."""
        try:
            await asyncio.wait_for(self.registered.wait(), self.config.register_timeout)
        except asyncio.TimeoutError:
            missing = self.enrolment.missing()
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
        while True:
            a = self.schedule.next(self._reachable)
            if a is None:
                if self.schedule.finished:
                    break
                await self._wait_for_a_holder()
                continue
            await self.hop(a)
        self.staging.release_spares()
        summary = self.summary()
        self.complete = True
        self.rt.state_label = "complete"
        await self.bulletin.run_complete(summary)
        await self.rt.publish(Shutdown("run complete"))
        return summary

    # -- liveness -----------------------------------------------------------------------------

    def _reachable(self, holder: str) -> bool:
        """May ``holder`` be granted now (not backing off after an undelivered grant)?"""
        if holder in self.refusals:
            return False
        return self.liveness.reachable(holder, self.rt.clock.monotonic(), self.rt.last_heard.get(holder, -1.0))

    async def _wait_for_a_holder(self) -> None:
        """Only holders that cannot be reached have work left: wait for one, bounded.

        A holder away for ``absent_timeout`` loses its chunks for this round (skipped
        and reported; later rounds try it again). If no holder of the run at all has
        been heard from for that long, the run stops with the reason (resumable)
        instead of skipping its way through the schedule.
        """
        assert self.schedule is not None
        waiting = self.schedule.pending_holders()
        if await self._skip_refusing(waiting):
            return
        self.rt.state_label = "waiting-for-holders"
        self.log.warning("no holder with work left can be reached (%s); waiting up to %.0fs", ", ".join(waiting), self.config.absent_timeout)
        clock, timeout = self.rt.clock, self.config.absent_timeout
        while (what := self.liveness.while_away(waiting, self.config.holders, clock.monotonic(), self.rt.last_heard)) is WhileAway.WAIT:
            await asyncio.sleep(min(0.05, self.config.backoff_min))
        if what is WhileAway.STOP:
            reason = f"no holder was reachable for {timeout:.0f}s ({', '.join(waiting)} have work left); the run stops here and continues with --resume"
            self._save_checkpoint()
            await self.rt.publish(Shutdown(reason))
            raise GtbusError(reason)
        if what is WhileAway.GIVE_UP:
            for h in waiting:
                skipped = self.schedule.give_up(h)
                self.log.warning("%s unreachable for %.0fs: skipped its %d remaining chunks of round %d", h, timeout, len(skipped), self.schedule.round)
        self.rt.state_label = "running"

    async def _skip_refusing(self, waiting: list[str]) -> bool:
        """Skip the chunks of holders that refused our measurement (they are never granted); stop if every holder did."""
        refused = [h for h in waiting if h in self.refusals]
        if not refused:
            return False
        if set(self.config.holders) <= set(self.refusals):
            self._save_checkpoint()
            reason = ("every holder of the run refused this orchestrator's code measurement ("
                      + "; ".join(f"{h}: {self.refusals[h]}" for h in self.config.holders)
                      + "): their --pin-code is not what `gtbus measure` prints for this trainer and backend")
            await self.rt.publish(Shutdown(reason))
            raise GtbusError(reason)
        assert self.schedule is not None
        for h in refused:
            skipped = self.schedule.give_up(h)
            self.log.warning("%s refused the measurement: skipped its %d remaining chunks of round %d", h, len(skipped), self.schedule.round)
        return True

    async def publish_state(self) -> None:
        """Publish who holds the token, at which epoch, in which phase."""
        t = self.token
        await self.rt.publish(TokenState(t.token_id, t.owner or self.rt.name, t.epoch, t.phase.value), epoch=t.epoch)

    async def hop(self, a: Assignment) -> HopResult:
        """One complete hop for ``a``, run by a :class:`HopRunner`, then settled; never raises for a holder's misbehaviour."""
        runner = self.current = HopRunner(self, a)
        for action in await runner.run():
            await self._after_hop[type(action)](action, a, runner.result)
        return runner.result

    async def _settle(self, act: Settle, a: Assignment, out: HopResult) -> None:
        assert self.schedule is not None
        if act.settlement is Settlement.DEFER:
            self.schedule.defer(a)
            self.liveness.unreached(a.holder, self.rt.clock.monotonic())
            out.detail += " (deferred: retried when the holder is back)"
        else:
            self.liveness.reached(a.holder)
            if act.settlement is Settlement.COMPLETE:
                self.schedule.complete(a)
            else:
                out.detail += " (will retry)" if self.schedule.fail(a) else " (skipped this round)"
        self.hops.append(out)

    async def _checkpoint(self, act: SaveCheckpoint, a: Assignment, out: HopResult) -> None:
        # --checkpoint-every N (RunConfig.checkpoint_every): a big model's checkpoint costs seconds a hop.
        every, done = self.config.checkpoint_every, self.schedule is not None and self.schedule.finished
        if every == 1 or done or len(self.hops) % every == 0:
            self._save_checkpoint()
        if self.current is not None:
            self.current.mark("checkpoint")

    async def _publish_record(self, act: PublishRecord, a: Assignment, out: HopResult) -> None:
        await self.bulletin.hop(out)
        if self.current is not None:
            self.current.mark("publish")
        if self.on_hop:
            self.on_hop(out)

    async def _stop_run(self, act: StopRun, a: Assignment, out: HopResult) -> None:
        # Nothing more is trained by this process (changed code, a buffer that kept data).
        await self.rt.publish(Shutdown(act.reason))
        raise GtbusError(act.reason)

    def note_eval(self, loss: float | None) -> None:
        """A trained hop's held-out loss before training: the run's first and last, for the summary."""
        if self.first_eval is None:
            self.first_eval = loss
        self.last_eval = loss

    # -- checkpoints --------------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        write_checkpoint(self.checkpoint_path, run_checkpoint(self))

    def _load_checkpoint(self) -> None:
        resume_run(self, read_checkpoint(self.checkpoint_path))
        self.log.info("resumed run %s at epoch %d", self.run_id, self.token.epoch)

    def restore_model(self) -> None:
        """Put the model of the last checkpoint (or the initial model) back on the device."""
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
