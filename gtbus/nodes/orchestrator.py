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
:class:`~gtbus.protocol.hop.HopMachine` (which drives its lane's
:class:`~gtbus.protocol.token.TokenMachine`), executed on the lane's device by
:class:`~gtbus.nodes.hop_runner.HopRunner`; which hop each lane does next by the
:class:`~gtbus.protocol.fleet.FleetSchedule` over the run's
:class:`~gtbus.protocol.schedule.Schedule`. This module is the asyncio shell
around them: registration, the dispatcher that runs the lanes, liveness,
merges, and the run-level actions a hop ends with (settle, checkpoint,
publish, stop).

The fleet (``--gpus K``, :mod:`gtbus.nodes.lane`): K GPU tokens travel at
once, each lane one hop at a time, all in this process (an asyncio task per
hop). The rules this shell keeps for them:

* one dispatcher decides: it hands idle lanes their next assignment, and
  waits for hops to end; messages from holders go to the lane whose token
  id they carry (a message for no lane is ignored with the token's reason);
* epochs come from one counter (:meth:`Orchestrator.align_epoch`), and the
  receive fence is the lowest epoch still in flight on any lane
  (:meth:`Orchestrator.raise_fence`), so a slower lane's hop is never refused;
* every ``merge_every`` trained hops the dispatcher stops handing out hops,
  and once no lane has one in flight it averages the live replicas
  (:mod:`gtbus.training.merge`) and, with K > 1, writes the checkpoint: a
  fleet is checkpointed only there (and when it stops or ends), where no hop
  is in flight and the replicas are one model. Hops in flight when a merge
  falls due finish first, so a merge covers up to ``merge_every + K - 1``
  hops (``--merge-every`` below K acts as K). A round's end is a merge (and
  checkpoint) point too: the next round's first hop waits for it;
* with ``--merge lockstep`` (:mod:`gtbus.training.lockstep`) hops start in
  waves (:attr:`FleetSchedule.waves`): the dispatcher hands every idle lane its
  hop in one pass while no lane has one in flight, opens the wave's
  :class:`~gtbus.training.lockstep.LockstepGroup` with those lanes, and each
  hop leaves the group when it ends, however it ends; the wave's end is a
  merge (``--merge-every`` does not apply): the replicas that trained in it
  are averaged (equal after equal steps) and copied into the lanes that sat
  it out, or, if a member left unfinished after its gradients were in its
  wave mates', every replica that trained in the wave is rolled back to the
  last merge and its hops reopened. Lanes in lockstep train on a worker
  thread of their own (one per lane, so K members waiting at a step's
  barrier never use up a shared pool, and the loop never waits at one), GPU
  lanes with their GPU made current on it;
* a chunk whose training is thrown away goes back into the schedule,
  untrained, in its round (:meth:`FleetSchedule.reopen`), so every chunk of a
  round ends up in the final model exactly once: a hop that rolls back
  restores its lane's replica from the checkpoint (with K > 1 the last merge,
  see :mod:`gtbus.protocol.fleet` for why not the hop's own start) and the
  hops that lane trained since are done again; their records say
  ``discarded``;
* a lane whose device fails (a :class:`~gtbus.errors.DeviceError` out of its
  hop) is retired: its token was revoked as the hop unwound, the hop is put
  back (not trained: another lane does it), and the run goes on with the
  other lanes, or stops with the reason when none is left. What the retired
  replica trained since the last merge goes back into the schedule as well.

With K = 1 there is one lane, nothing to merge, and a checkpoint after every
hop (``--checkpoint-every``), as before fleets; with N > 1, at every round's
end too, and a rollback re-queues the hops since the last checkpoint.

Its parts, each in its own module: the lanes (:mod:`gtbus.nodes.lane`), epochs reserved
on disk (:mod:`gtbus.nodes.epochs`), hop buffers (:mod:`gtbus.nodes.staging_pool`),
the checkpoint file (:mod:`gtbus.training.checkpoint`), the code measurement
(:mod:`gtbus.gpu.code_measure`) and the run summary (:mod:`gtbus.nodes.run_summary`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Sequence, cast

from gtbus.errors import ConfigError, DeviceError, GtbusError, TransportError
from gtbus.attest import run_binding
from gtbus.attest.emulated import EmulatedVerifier
from gtbus.gpu.attestation import MeasurementReport, PlatformSigner, channel_key_commitment
from gtbus.nodes.attester import EvidenceServer
from gtbus.gpu.blas_threads import cap_blas_threads
from gtbus.gpu.code_measure import code_measurement, loaded_code
from gtbus.gpu.device import Device
from gtbus.messages.identity import Role
from gtbus.messages.pipeline import Accepted
from gtbus.messages.types import (
    Echo,
    EchoReply,
    HopPrepare,
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
from gtbus.nodes.hop_prepare import PrepareCounts, prepare_hop, release_prepared
from gtbus.nodes.hop_runner import HopRunner
from gtbus.nodes.lane import Lane, token_id_of
from gtbus.nodes.run_checkpoint import lane_state, resume_run, run_checkpoint
from gtbus.nodes.run_config import RunConfig
from gtbus.nodes.run_provenance import manifest_path, send_receipts, write_run_manifest
from gtbus.nodes.bulletin import Bulletin
from gtbus.nodes.run_summary import HopResult, fleet_summary, hop_progress, run_summary
from gtbus.nodes.runtime import NodeRuntime
from gtbus.nodes.staging_pool import StagingPool
from gtbus.private_files import private_dir
from gtbus.provenance.ledger import ProvenanceLedger
from gtbus.protocol.enrolment import Enrolment, Refused
from gtbus.protocol.fleet import FleetSchedule
from gtbus.protocol.schedule import Assignment, Schedule
from gtbus.protocol.hop import Acked, Declined, HopOutcome, PublishRecord, Returned, SegmentShipped, Settle, Settlement, StopRun
from gtbus.protocol.hop import Checkpoint as SaveCheckpoint
from gtbus.protocol.liveness import HolderLiveness, WhileAway
from gtbus.protocol.token import TokenMachine, Verdict
from gtbus.training.checkpoint import read_checkpoint, write_checkpoint
from gtbus.training.lockstep import LockstepGroup
from gtbus.training.merge import ModelMerge
from gtbus.training.nccl_merge import fleet_merge
from gtbus.training.trainer import Trainer
from gtbus.transport.base import Delivery


class Orchestrator:
    """Runs the schedule on K lanes (GPU tokens), each one hop at a time, each hop with a fresh buffer and key."""

    def __init__(
        self,
        runtime: NodeRuntime,
        device: Device | Sequence[Device],
        trainer: Trainer | Sequence[Trainer],
        platform: PlatformSigner,
        config: RunConfig,
        *,
        on_hop: Callable[[HopResult], None] | None = None,
        tamper_hook: Callable[[Lane, Assignment, str], None] | None = None,
        merge: ModelMerge | None = None,
    ) -> None:
        """``device`` and ``trainer``: one each, or one per lane (``config.gpus``), the trainers built from one seed."""
        devices: list[Device] = list(device) if isinstance(device, (list, tuple)) else [cast(Device, device)]
        trainers: list[Trainer] = list(trainer) if isinstance(trainer, (list, tuple)) else [cast(Trainer, trainer)]
        if len(devices) != config.gpus or len(trainers) != config.gpus:
            raise ConfigError(f"{config.gpus} GPU lanes need as many devices and trainers, got {len(devices)} and {len(trainers)}")
        self.rt = runtime
        self.platform = platform
        self.config = config
        self.on_hop = on_hop
        self.tamper_hook = tamper_hook  # failure injection for tests only
        self.log = logging.getLogger(f"gtbus.orchestrator.{runtime.name}")
        self.state_dir = private_dir(config.run_dir / "state" / runtime.name)
        self.checkpoint_path = config.run_dir / "checkpoints" / f"{runtime.name}.npz"
        self.run_id = config.run_id or os.urandom(6).hex()
        # Holders appraise this evidence (for their nonce, of this code and run) before their first provisioning.
        self.evidence = EvidenceServer(runtime, {"emulated": EmulatedVerifier(platform, lambda: {"code": self.code_hash}, lambda: run_binding(self.run_id))})
        self.enrolment = Enrolment(config.holders)
        self.datasets: dict[str, list[Any]] = {}  # from the checkpoint resumed, if any
        # The enrolment's own tables, by their old names: manifests, remote holder -> its device agent, agents in.
        self.manifests, self.via, self.agents = self.enrolment.manifests, self.enrolment.via, self.enrolment.agents
        self.registered = asyncio.Event()
        self.hops: list[HopResult] = []
        self.epochs = EpochReservation(self.state_dir / "epoch")
        self.last_epoch = self.epochs.reserved_upto  # the newest epoch issued by any lane (one counter for the fleet)
        k = len(devices)
        self.lanes = [
            Lane(i, TokenMachine(token_id_of(i, k), last_epoch=self.last_epoch), devices[i], trainers[i],
                 StagingPool(devices[i], self.state_dir if i == 0 else private_dir(self.state_dir / f"lane{i}"), self.log))
            for i in range(k)
        ]
        self.schedule: Schedule | None = None
        self.fleet: FleetSchedule | None = None
        # Replicas on distinct GPUs merge over NCCL, lanes sharing a GPU (or on the host) in-process.
        self.merge = merge or fleet_merge(config.merge, devices)
        self.wave = self._lockstep_group(devices, trainers)  # None unless the lanes train in lockstep waves
        self._lane_threads: dict[int, ThreadPoolExecutor] = {}  # a host lane's worker thread (training off the loop)
        self.blas_threads: int | None = None  # the BLAS thread cap of the run's host lanes (None: not capped)
        self.merges = 0
        self.merge_s = 0.0
        self.trained_since_merge = 0  # trained hops of the fleet since the last merge
        self.lanes_failed: list[dict[str, Any]] = []
        self.prepares = PrepareCounts()  # next hops made while the hop before ran (gtbus.nodes.hop_prepare)
        self._preparing: set[asyncio.Task[None]] = set()
        self.provenance = ProvenanceLedger()  # commitments and model digests of the trained hops (the manifest's)
        self.code_hash = b""
        self.loaded_code: dict[str, bytes] = {}
        self.current: HopRunner | None = None  # the hop of any lane started last (with one lane: in progress, or the last one)
        self._after_hop: dict[type, Callable[[Any, HopRunner], Awaitable[None]]] = {
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

    def _lockstep_group(self, devices: Sequence[Device], trainers: Sequence[Trainer]) -> LockstepGroup | None:
        """The wave barrier of ``--merge lockstep`` with K > 1 (None otherwise); ConfigError where lanes cannot train in lockstep."""
        reduce = self.merge.gradients
        if reduce is None or len(devices) < 2:
            return None
        if "grad_sync" not in inspect.signature(trainers[0].train_on).parameters:
            raise ConfigError(f"--merge {self.merge.name} needs a trainer whose train_on takes grad_sync; {type(trainers[0]).__name__}'s does not")
        return LockstepGroup(reduce)

    def lane_thread(self, lane: Lane) -> ThreadPoolExecutor:
        """The worker thread ``lane`` trains on off the loop (made on first use, one per lane)."""
        if lane.index not in self._lane_threads:
            self._lane_threads[lane.index] = ThreadPoolExecutor(1, thread_name_prefix=f"gtbus-lane{lane.index}")
        return self._lane_threads[lane.index]

    # -- the first lane, by the names a single token had -------------------------------------

    @property
    def token(self) -> TokenMachine:
        """The first lane's token (with one GPU, the run's token)."""
        return self.lanes[0].token

    @property
    def device(self) -> Device:
        """The first lane's device (with one GPU, the run's device)."""
        return self.lanes[0].device

    @property
    def trainer(self) -> Trainer:
        """The first lane's trainer replica (with one GPU, the run's model)."""
        return self.lanes[0].trainer

    @property
    def staging(self) -> StagingPool:
        """The first lane's hop buffers."""
        return self.lanes[0].staging

    # -- handlers ---------------------------------------------------------------------------

    def report(self, key: bytes | None, epoch: int, model_hash: bytes | None = None, *, lane: Lane | None = None) -> dict[str, Any]:
        """A signed measurement report (code, model, device of ``lane``, default the first) committing to the channel ``key``, as wire data."""
        lane = lane or self.lanes[0]
        if model_hash is None:
            model_hash = lane.measure_model()
        rep = MeasurementReport(
            code_hash=self.code_hash,
            model_hash=model_hash,
            device_id=lane.device.device_id,
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
            "lanes": [lane.state(self.rt.name) for lane in self.lanes],
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

    def _lane_of(self, token_id: str) -> Lane | None:
        return next((lane for lane in self.lanes if lane.token.token_id == token_id), None)

    def _feed(self, event: Acked | Returned | Declined | SegmentShipped) -> tuple[Verdict, Lane | None]:
        # The message goes to the lane whose token it names. Between hops that lane's
        # last hop machine judges it (through the token): never a new decision.
        lane = self._lane_of(event.token_id)
        if lane is None:
            return Verdict(False, f"unknown token {str(event.token_id)[:16]!r}"), None
        if lane.current is None:
            return Verdict(False, "no hop yet"), lane
        return lane.current.feed(event).verdict, lane

    async def _on_ack(self, acc: Accepted[TokenAck], delivery: Delivery) -> None:
        h = acc.header
        v, _ = self._feed(Acked(h.sender, h.epoch, acc.message.token_id))
        if not v.accepted:
            self.log.info("ignored ack from %s: %s", h.sender, v.reason)

    async def _on_return(self, acc: Accepted[TokenReturn], delivery: Delivery) -> None:
        h, m = acc.header, acc.message
        v, _ = self._feed(Returned(h.sender, h.epoch, m.token_id, m.chunk_index, m.segments, m.nbytes, m.chunk_commitment))
        if not v.accepted:
            self.log.warning("ignored return from %s: %s", h.sender, v.reason)

    async def _on_decline(self, acc: Accepted[TokenDecline], delivery: Delivery) -> None:
        h = acc.header
        v, _ = self._feed(Declined(h.sender, h.epoch, acc.message.token_id, acc.message.reason))
        if not v.accepted:
            self.log.info("ignored decline from %s: %s", h.sender, v.reason)

    async def _on_ship_segment(self, acc: Accepted[ShipSegment], delivery: Delivery) -> None:
        h, m = acc.header, acc.message
        size = memoryview(acc.blobs[0]).nbytes if len(acc.blobs) == 1 else -1
        v, lane = self._feed(SegmentShipped(h.sender, h.epoch, m.token_id, m.index, m.count, size))
        if not v.accepted:
            self.rt.note_refused(v.reason if v.reason.startswith("ship-segment-") else "ship-segment-outside-a-ship-hop", h.sender)
            return
        assert lane is not None and lane.current is not None
        lane.current.store_shipped(m.index, acc.blobs[0])

    # -- the run ------------------------------------------------------------------------------

    async def setup(self) -> None:
        """Load the model, measure it, resume from a checkpoint if asked, publish the measurement."""
        for lane in self.lanes:
            lane.staging.discard_inflight()
            with lane.device.active():  # cupy: the replica on its lane's GPU
                lane.trainer.load(lane.device.array_module)  # one seed: the replicas start identical
        # Every lane runs the same trainer and device code: one measurement is what holders pin.
        self.code_hash = code_measurement(self.trainer, self.device)
        self.loaded_code = loaded_code(self.trainer, self.device)
        if self.config.resume:
            self._load_checkpoint()
        if not self.provenance.initial_model:
            self.provenance.initial_model = self.lanes[0].measure_model()
        self.merge.start(self.trainer)  # every replica is this model now: later updates are measured from it
        # The first hop's buffers are made now, while holders register, as every
        # later hop's are made while the hop before it trains (no grant names them yet).
        cfg = self.config
        for lane in self.lanes:
            lane.staging.prepare_private(cfg.capacity)
            if cfg.mode == "travel":
                lane.staging.prepare_next(cfg.staging_bytes)
        await self.rt.publish(MeasurementPublished(self.report(None, self.token.epoch)))

    async def wait_for_holders(self) -> None:
        """Wait until every configured holder registered (ConfigError naming the missing ones)."""
        try:
            await asyncio.wait_for(self.registered.wait(), self.config.register_timeout)
        except asyncio.TimeoutError:
            missing = self.enrolment.missing()
            raise GtbusError(f"nodes did not register within {self.config.register_timeout:.0f}s: {', '.join(missing)}") from None

    async def run(self) -> dict[str, Any]:
        """Setup, wait for holders, run every hop of the schedule on the lanes; return the summary."""
        # Host lanes train with numpy on threads of this process: K of them share the cores' BLAS threads.
        try:
            with cap_blas_threads(len(self.lanes) if self.device.array_module.__name__ == "numpy" else 1, self.log) as self.blas_threads:
                return await self._run()
        finally:
            for pool in self._lane_threads.values():
                pool.shutdown(wait=False)

    async def _run(self) -> dict[str, Any]:
        await self.setup()
        self.rt.state_label = "waiting-for-holders"
        await self.wait_for_holders()
        if len(self.lanes) > 1 and self.via:
            # A device agent stages one hop at a time (gtbus.protocol.agent_stage).
            reason = f"--gpus {len(self.lanes)} with holders that write through a device agent ({', '.join(sorted(self.via))}) is not supported: the agent stages one hop at a time"
            await self.rt.publish(Shutdown(reason))
            raise ConfigError(reason)
        self.rt.state_label = "running"
        if self.fleet is None:
            if self.schedule is None:
                self.schedule = Schedule(
                    {h: self.manifests[h].chunk_count for h in self.config.holders},
                    self.config.rounds,
                    max_attempts=self.config.max_attempts,
                )
            self.fleet = FleetSchedule(self.schedule, len(self.lanes))
        self.fleet.waves = self.wave is not None  # a resumed one's too: the run's merge policy decides, not the checkpoint
        await self._dispatch()
        if len(self.lanes) > 1 and self._live():
            self._save_checkpoint()  # merges what the lanes trained since the last merge first
        for task in self._preparing:
            task.cancel()  # one not yet started never makes its staging; one sending has, and it is released below
        for lane in self.lanes:
            release_prepared(lane, self.prepares)
            lane.staging.release_spares()
        # What trained the model, signed; each holder's share sent to it before the end is announced.
        manifest = write_run_manifest(self)
        await send_receipts(self, manifest)
        summary = self.summary()
        summary["manifest"] = str(manifest_path(self.config.run_dir))
        self.complete = True
        self.rt.state_label = "complete"
        await self.bulletin.run_complete(summary)
        await self.rt.publish(Shutdown("run complete"))
        return summary

    # -- the lanes ----------------------------------------------------------------------------

    def _live(self) -> list[Lane]:
        return [lane for lane in self.lanes if lane.failed is None]

    def _merge_due(self) -> bool:
        """No new hop until the lanes are merged and checkpointed: every ``merge_every`` trained hops, and
        at a round's end while a replica holds training the checkpoint lacks (a rollback or a retirement
        can then put that training back into its own round); in lockstep, after every wave that trained."""
        if self.wave is not None and self._live() and (self.trained_since_merge or self.wave.tainted):
            return True
        if len(self._live()) > 1 and self.trained_since_merge >= self.config.merge_interval:
            return True
        fleet = self.fleet
        return fleet is not None and fleet.round_settled and not fleet.finished and any(lane.unsaved for lane in self._live())

    async def _dispatch(self) -> None:
        """Hand idle lanes their next hop, wait for hops to end, merge when due, until the schedule is done.

        Cancelled (shutdown, Ctrl-C) or stopped by a hop (StopRun): every hop still
        in flight is cancelled and unwinds (its token taken back, its buffers scrubbed).
        """
        fleet = self.fleet
        assert fleet is not None
        running: dict[asyncio.Task[HopResult], Lane] = {}
        try:
            while True:
                if self._merge_due():
                    if not running:  # the lanes are paused between hops: merge (and checkpoint) now
                        self._save_checkpoint()
                        continue  # and hand out hops again (not a wait for holders: none was asked yet)
                elif fleet.may_start and not (fleet.waves and running):
                    # In waves, a hop that settled (its lane released) may still be publishing its record: the
                    # next wave waits for its task too, which leaves the wave's group as it ends.
                    started = []
                    for lane in self._live():
                        if lane in running.values():
                            continue
                        a = fleet.next_for(lane.index, self._reachable)
                        if a is None:
                            break  # nothing any idle lane may take now
                        running[asyncio.create_task(self.hop(a, lane))] = lane
                        started.append(lane.index)
                    if started and self.wave is not None:
                        self.wave.open_wave(started)  # before any of them runs: every member is expected from now
                if not running:
                    if fleet.finished:
                        return
                    if self._merge_due():
                        continue
                    if not self._live():
                        await self._stop_all_failed()
                    await self._wait_for_a_holder()
                    continue
                # An idle lane may find work as a holder comes back from its backoff: look again soon.
                idle = len(running) < len(self._live()) and not self._merge_due() and not fleet.waves
                done, _ = await asyncio.wait(running, timeout=self.config.backoff_min if idle else None, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    await self._hop_ended(task, running.pop(task))
                self.raise_fence()
        except BaseException:
            if self.wave is not None:
                self.wave.close("the run stops")  # members waiting at a step return instead of training on alone
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise

    async def _hop_ended(self, task: asyncio.Task[HopResult], lane: Lane) -> None:
        exc = task.exception()
        if exc is None:
            return
        if not isinstance(exc, DeviceError):
            raise exc  # StopRun's reason, or a bug: the run stops
        await self._retire(lane, str(exc))

    async def _retire(self, lane: Lane, reason: str) -> None:
        """The lane's device failed: retire it; its hop (already unwound: token revoked, buffers scrubbed) goes back."""
        assert self.fleet is not None
        a = self.fleet.lane_of(lane.index)
        lane.failed = reason
        self.lanes_failed.append({"lane": lane.index, "token_id": lane.token_id, "reason": reason, "trained_hops_requeued": len(lane.unsaved)})
        self.log.error(
            "lane %d (token %s) failed and is retired: %s; %s", lane.index, lane.token_id, reason,
            f"{a.holder} chunk {a.chunk} goes back to the schedule (not trained)" if a is not None else "it had no hop",
        )
        self._requeue_unsaved(lane, f"lane {lane.index} was retired")
        if a is None:
            return
        self.fleet.release(lane.index, "deferred")
        runner = lane.current
        if runner is not None and runner.a == a:
            out = runner.result
            out.epoch, out.outcome = runner.machine.epoch, HopOutcome.ABORTED.value
            out.detail = f"lane {lane.index} failed: {reason} (the chunk goes back to the schedule)"
            self.hops.append(out)
            await self.bulletin.hop(out)
            if self.on_hop:
                self.on_hop(out)

    async def _stop_all_failed(self) -> None:
        reason = "every GPU lane failed (" + "; ".join(f"gpu{f['lane']}: {f['reason']}" for f in self.lanes_failed) + "); the run stops here and continues with --resume from the last merge"
        await self.rt.publish(Shutdown(reason))
        raise GtbusError(reason)

    def align_epoch(self, token: TokenMachine) -> None:
        """Have ``token``'s next grant take the fleet's next epoch (call right before the grant)."""
        token.epoch = max(token.epoch, self.last_epoch)

    def note_epoch(self, epoch: int) -> None:
        """``epoch`` was issued (reserved on disk): the fleet's counter moves to it."""
        self.last_epoch = max(self.last_epoch, epoch)

    def raise_fence(self) -> None:
        """Fence the receive pipeline at the lowest epoch still in flight on any lane (the newest issued when none is).

        One fence for every lane: a slower lane's hop in flight is never refused, and
        anything older than every hop in flight is. Each lane's token refuses the
        epochs above the fence that are not its own hop's.
        """
        flying = [e for lane in self.lanes if (e := lane.in_flight_epoch)]
        self.rt.guard.raise_fence(min(flying) if flying else self.last_epoch)

    def _requeue_unsaved(self, lane: Lane, why: str) -> None:
        """``lane``'s replica lost what it trained since the checkpoint: those chunks go back into their round, untrained."""
        thrown = lane.unsaved
        lane.unsaved = []
        if not thrown:
            return
        assert self.fleet is not None  # a hop trained: the run is scheduled
        self.fleet.reopen([Assignment(h.round, h.holder, h.chunk) for h in thrown])
        for h in thrown:
            h.discarded = True
            h.detail = (h.detail + "; " if h.detail else "") + f"training discarded ({why}): the chunk was put back into round {h.round}"
        n = len(thrown)
        self.trained_since_merge -= min(self.trained_since_merge, n)
        lane.trained_since_merge -= min(lane.trained_since_merge, n)
        self.log.warning("%s: the %d hop(s) its replica trained since the last %s go back to the schedule (%s)", why, n,
                         "merge" if len(self.lanes) > 1 else "checkpoint", ", ".join(f"{h.holder} chunk {h.chunk}" for h in thrown))

    def _merge(self) -> None:
        """Average the live replicas' parameters into each (no lane may be training); in lockstep, those that trained."""
        live = self._live()
        if self.wave is not None and self.wave.tainted:
            self._roll_back_wave(live)
        if len(live) < 2 or self.trained_since_merge == 0:
            return
        assert not any(lane.busy for lane in live), "a merge while a lane has a hop in flight"
        t = time.perf_counter()
        for lane in live:
            lane.model_digest = None  # the merge writes every replica
        if self.wave is None:
            self.merge.average([lane.trainer for lane in live])
        else:
            # The wave's replicas are the model (one after equal steps); the lanes that sat it out hold the last merge's
            # and receive it (on several GPUs by the same collective, not a copy across GPUs).
            self.merge.average([lane.trainer for lane in live if lane.trained_since_merge],
                               into=[lane.trainer for lane in live if not lane.trained_since_merge])
        took = time.perf_counter() - t
        self.merges += 1
        self.merge_s += took
        merged = [h.epoch for lane in live for h in lane.unsaved]
        self.provenance.merged(self.last_epoch, merged, live[0].measure_model())
        self.log.info("merge %d (%s): merged %d replicas after %d trained hops in %.1f ms", self.merges, self.merge.name, len(live), self.trained_since_merge, took * 1e3)
        self.trained_since_merge = 0
        for lane in live:
            lane.trained_since_merge = 0

    def _roll_back_wave(self, live: list[Lane]) -> None:
        """A lockstep member left unfinished after its gradients went into its wave mates': every replica that
        trained in the wave goes back to the last merge and its hops are reopened (nothing is trained twice)."""
        assert self.wave is not None
        left = ", ".join(f"gpu{i}" for i in self.wave.tainted)
        self.wave.tainted = []
        for lane in live:
            if lane.unsaved:
                self.log.warning("lockstep wave: %s left unfinished after its gradients were averaged into lane %d's replica", left, lane.index)
                self.restore_model(lane)

    # -- the next hop, ahead --------------------------------------------------------------------

    def prepare_next_hop(self, lane: Lane) -> None:
        """``lane``'s grant is out: make the hop it likely runs next, and send its holder the params, soon.

        Runs after the grant's own actions (the token state goes out first), while
        the holder works; see :mod:`gtbus.nodes.hop_prepare` for where it is made.
        """
        cfg = self.config
        if not cfg.prepare or cfg.mode != "travel" or len(self.lanes) != 1 or lane.prepared is not None or self.fleet is None:
            return
        task = asyncio.create_task(self._prepare_next_hop(lane))
        self._preparing.add(task)
        task.add_done_callback(self._preparing.discard)

    async def _prepare_next_hop(self, lane: Lane) -> None:
        assert self.fleet is not None
        a = self.fleet.likely_next(lane.index, self._reachable)
        if a is None or a.holder in self.via or lane.prepared is not None or lane.failed is not None:
            return
        try:
            lane.prepared = prepare_hop(lane, a, self.config, self.rt.roster[a.holder].x25519)
        except DeviceError as exc:  # the hop will allocate its own and meet the same failure there, in its own unwinding
            self.log.warning("could not prepare the next hop on lane %d: %s", lane.index, exc)
            return
        self.prepares.made += 1
        p = lane.prepared
        try:
            await self.rt.send(HopPrepare(lane.token_id, self.run_id, a.holder, a.chunk, p.sealed), a.holder)
        except TransportError:
            pass  # the holder is not connected now: its grant carries the same params, opened then

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
        assert self.fleet is not None
        waiting = self.fleet.pending_holders()
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
                skipped = self.fleet.give_up(h)
                self.log.warning("%s unreachable for %.0fs: skipped its %d remaining chunks of round %d", h, timeout, len(skipped), self.fleet.schedule.round)
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
                      + "): their --pin-code is not what `gtbus measure` prints for this trainer and backend, or their --attest-policy refuses its evidence")
            await self.rt.publish(Shutdown(reason))
            raise GtbusError(reason)
        assert self.fleet is not None
        for h in refused:
            skipped = self.fleet.give_up(h)
            self.log.warning("%s refused the measurement: skipped its %d remaining chunks of round %d", h, len(skipped), self.fleet.schedule.round)
        return True

    async def publish_state(self, lane: Lane | None = None) -> None:
        """Publish who holds ``lane``'s token (default the first's), at which epoch, in which phase."""
        t = (lane or self.lanes[0]).token
        await self.rt.publish(TokenState(t.token_id, t.owner or self.rt.name, t.epoch, t.phase.value), epoch=t.epoch)

    async def hop(self, a: Assignment, lane: Lane | None = None) -> HopResult:
        """One complete hop for ``a`` on ``lane`` (default the first), run by a :class:`HopRunner`, then settled.

        Never raises for a holder's misbehaviour; a DeviceError out of it means the lane's device failed.
        """
        lane = lane or self.lanes[0]
        try:
            runner = self.current = lane.current = HopRunner(self, lane, a)
            for action in await runner.run():
                await self._after_hop[type(action)](action, runner)
            if self.tamper_hook:
                self.tamper_hook(lane, a, "after")
            return runner.result
        finally:
            if self.wave is not None:
                self.wave.leave(lane.index, finished=False)  # nothing if its training returned; else its wave mates stop waiting for it

    async def _settle(self, act: Settle, runner: HopRunner) -> None:
        assert self.fleet is not None
        a, out, lane = runner.a, runner.result, runner.lane
        if act.settlement is Settlement.DEFER:
            self.fleet.release(lane.index, "deferred")
            self.liveness.unreached(a.holder, self.rt.clock.monotonic())
            out.detail += " (deferred: retried when the holder is back)"
        else:
            self.liveness.reached(a.holder)
            if act.settlement is Settlement.COMPLETE:
                self.fleet.release(lane.index, "done")
                self.trained_since_merge += 1
                lane.trained_since_merge += 1
                lane.unsaved.append(out)
            else:
                self.fleet.release(lane.index, "failed")
                out.detail += " (skipped this round)" if self.fleet.schedule.skipped[-1:] == [(a.round, a.holder, a.chunk)] else " (will retry)"
        self.hops.append(out)

    async def _checkpoint(self, act: SaveCheckpoint, runner: HopRunner) -> None:
        # --checkpoint-every N (RunConfig.checkpoint_every): a big model's checkpoint costs seconds a hop.
        # A fleet with other lanes serving may have hops in flight now: it is checkpointed at merges instead.
        every, done = self.config.checkpoint_every, self.fleet is not None and self.fleet.finished
        if len(self._live()) == 1 and (every == 1 or done or len(self.hops) % every == 0):
            self._save_checkpoint()
        runner.mark("checkpoint")

    async def _publish_record(self, act: PublishRecord, runner: HopRunner) -> None:
        await self.bulletin.hop(runner.result)
        runner.mark("publish")
        if self.on_hop:
            self.on_hop(runner.result)

    async def _stop_run(self, act: StopRun, runner: HopRunner) -> None:
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
        # A fleet is checkpointed as one model: what the lanes trained since the last merge is merged first.
        self._merge()
        if not self._live():
            return  # no replica left to save: the last checkpoint (the last merge) stands
        write_checkpoint(self.checkpoint_path, run_checkpoint(self))
        for lane in self.lanes:
            lane.unsaved = []  # the checkpoint holds every serving replica's training now (merged)

    def _load_checkpoint(self) -> None:
        resume_run(self, read_checkpoint(self.checkpoint_path))
        self.log.info("resumed run %s at epoch %d", self.run_id, self.last_epoch)

    def restore_model(self, lane: Lane | None = None) -> None:
        """Put ``lane``'s replica (default the first's) of the last checkpoint (or the initial model) back on its device.

        What the replica trained since goes back into the schedule (:meth:`_requeue_unsaved`).
        """
        lane = lane or self.lanes[0]
        lane.model_digest = None
        with lane.device.active():
            if self.checkpoint_path.exists():
                lane.trainer.load_state_dict(lane_state(read_checkpoint(self.checkpoint_path).trainer_state(), lane.index))
            else:
                lane.trainer.load(lane.device.array_module)
        self._requeue_unsaved(lane, f"lane {lane.index} was rolled back" if len(self.lanes) > 1 else "the model was rolled back")

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
            last_epoch=self.last_epoch,
            skipped=self.schedule.skipped if self.schedule else [],
            **fleet_summary(self.hops, gpus=len(self.lanes), merges=self.merges, merge_s=self.merge_s, failed=self.lanes_failed),
            prepared_hops=self.prepares.as_dict(),
            merge=self.merge.name,
            blas_threads=self.blas_threads,
            logs=str(self.config.run_dir / "logs"),
            checkpoint=str(self.checkpoint_path),
        )
