"""The orchestrator's hop shell: runs one :class:`~gtbus.protocol.hop.HopMachine` on a lane's device, trainer and the network.

A hop belongs to one lane (:mod:`gtbus.nodes.lane`): its token, device, trainer
replica and staging pool; the epoch counter, the receive fence, the checkpoint
and the run's records are the orchestrator's, shared by its lanes.

The machine decides; this module does what it is told, and feeds back what
happened (DESIGN section 6):

* :class:`~gtbus.protocol.hop.NewEpoch`: reserve the epoch on disk, raise the
  receive fence;
* :class:`~gtbus.protocol.hop.SendGrant`: seal the hop's channel params to the
  holder, sign a measurement report committing to the key, have the device
  agent stage the buffer first (a remote holder), send; answer
  ``Delivered``/``Undelivered``;
* :class:`~gtbus.protocol.hop.OpenSegments`: authenticate and decrypt into the
  private buffer (never exported); answer ``SegmentsOpened``/``SegmentsRefused``.
  The staging (ciphertext only, never read again) is scrubbed, verified zero
  and revoked in the epilogue, before anything else is granted;
* :class:`~gtbus.protocol.hop.Remeasure`, :class:`~gtbus.protocol.hop.Train`,
  :class:`~gtbus.protocol.hop.RestoreModel`, :class:`~gtbus.protocol.hop.Scrub`
  (scrub, verify zero, release, drop the key), revokes and token state.

Messages from the network reach the hop through :meth:`HopRunner.feed`; the
lease is the machine's :attr:`~gtbus.protocol.hop.HopMachine.wake_at`. The
run-level actions (settle, checkpoint, publish the record, stop the run) are
handed back to the orchestrator in order. No rule lives here: every check that
could fail becomes an event that says what happened.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

import numpy

from gtbus.errors import ChannelError, DeviceError, GtbusError, ProtocolError, TransportError
from gtbus.gpu.backends import device_gpu
from gtbus.gpu.bounce import BounceSet
from gtbus.gpu.channel import ChannelParams, SegmentContext
from gtbus.gpu.code_measure import first_change, loaded_code
from gtbus.gpu.sealing import seal_bytes, seal_params
from gtbus.messages.types import AgentReady, AgentStage, TokenGrant, TokenRevoke
from gtbus.nodes.hop_phases import ORCHESTRATOR_PHASES, PhaseClock
from gtbus.nodes.hop_prepare import take_prepared
from gtbus.nodes.run_summary import HopResult
from gtbus.nodes.ship_receiver import ShipReceiver
from gtbus.protocol.admission import TOKEN_BYTES
from gtbus.protocol.hop import (
    Aborted,
    Acked,
    Begin,
    Checkpoint,
    Delivered,
    HopAction,
    HopEvent,
    HopMachine,
    HopPhase,
    LeaseExpired,
    NewEpoch,
    OpenSegments,
    PublishRecord,
    PublishTokenState,
    Remeasure,
    Returned,
    Remeasured,
    RestoreModel,
    Scrub,
    Scrubbed,
    SegmentsOpened,
    SegmentsRefused,
    SendGrant,
    SendRevoke,
    Settle,
    Step,
    StopRun,
    Train,
    Trained,
    TrainingRefused,
    Undelivered,
)
from gtbus.protocol.schedule import Assignment
from gtbus.training.nccl_merge import spans_gpus
from gtbus.training.trainer import TrainReport

if TYPE_CHECKING:  # the orchestrator owns the runner; only its type is named here
    from gtbus.nodes.lane import Lane
    from gtbus.nodes.orchestrator import Orchestrator

_T = TypeVar("_T")
RUN_ACTIONS = (Settle, Checkpoint, PublishRecord, StopRun)  # performed by the orchestrator, after the hop
_WAITING = (HopPhase.READY, HopPhase.GRANTING, HopPhase.AWAITING)


class HopRunner:
    """One hop of one lane: the machine, the hop's buffers and key, and the record of what it did."""

    def __init__(self, orch: Orchestrator, lane: Lane, a: Assignment) -> None:
        cfg = orch.config
        self.orch, self.lane, self.cfg, self.a = orch, lane, cfg, a
        self.rt, self.device, self.trainer = orch.rt, lane.device, lane.trainer
        self.log = logging.getLogger(f"gtbus.hop.{orch.rt.name}")
        ship = cfg.mode == "ship"
        # What the granted chunk must come back as, from the admitted manifest.
        chunk_bytes = orch.manifests[a.holder].chunk_tokens_of(a.chunk, cfg.chunk_tokens) * TOKEN_BYTES
        self.machine = HopMachine(lane.token, a, chunk_bytes=chunk_bytes, segment_size=cfg.segment, lease=cfg.lease, ship=ship, via=orch.via.get(a.holder))
        self.result = HopResult(0, a.round, a.holder, a.chunk, cfg.mode, "pending", lane=lane.index, token_id=lane.token_id)
        self._queue: deque[HopAction] = deque()
        self._wake = asyncio.Event()
        self.clock = PhaseClock(ORCHESTRATOR_PHASES)  # where this hop's time goes (measurement only)
        if ship and lane.ship_buf is None:
            lane.ship_buf = BounceSet(lane.device.array_module, cfg.segment)  # sized by the run, never by a peer's claim
        self.shipping: ShipReceiver | None = None  # ship mode: the segments on their way to the device
        self.staging: Any  # this hop's fresh staging buffer (None in ship mode, and once released)
        self.handle: Any
        # Made while the hop before ran, if it guessed this hop (gtbus.nodes.hop_prepare): the same
        # staging, key and sealed params its holder has already opened and mapped.
        prepared = None if ship else take_prepared(lane, a, cfg.staging_bytes, orch.prepares)
        self.sealed_params = prepared.sealed if prepared is not None else None  # sealed to the holder already
        if prepared is not None:
            self.staging, self.handle = prepared.staging, prepared.handle
        elif ship:
            self.staging, self.handle = None, "ship"
        else:
            self.staging, self.handle = lane.staging.take_staging(cfg.staging_bytes)
        self.data = lane.staging.take_private(cfg.capacity)
        self.mark("staging_alloc")
        self.params: ChannelParams | None = prepared.params if prepared is not None else cfg.hop_params(self.handle)
        self.mark("key")
        self.model_before = b""
        self._do: dict[type, Callable[[Any], Awaitable[HopEvent | None]]] = {
            NewEpoch: self._new_epoch,
            SendGrant: self._send_grant,
            PublishTokenState: self._publish_state,
            SendRevoke: self._send_revoke,
            OpenSegments: self._open_segments,
            Remeasure: self._remeasure,
            Train: self._train,
            RestoreModel: self._restore_model,
            Scrub: self._scrub,
        }

    # -- feeding the machine ----------------------------------------------------------------

    def feed(self, event: HopEvent) -> Step:
        """Hand the machine an event (a message from the network); its actions run in :meth:`run`."""
        phase = self.machine.phase
        decided = self.machine.outcome
        step = self.machine.handle(event)
        self._queue.extend(step.actions)
        if step.verdict.accepted and isinstance(event, (Acked, Returned)):
            self.mark("ack_received" if isinstance(event, Acked) else "return_received")
            # Its grant went through its shell's check of what it had prepared: any staging it
            # was prepared for before and not granted, it has let go of.
            self.lane.staging.free_retired(self.a.holder)
        if phase in _WAITING and self.machine.phase not in _WAITING:
            self.result.provision_s = time.perf_counter() - self.clock.t0
        if decided is None and self.machine.outcome is not None and self.machine.detail:
            self.log.warning("hop %d from %s: %s: %s", self.machine.epoch, self.a.holder, self.machine.outcome.value, self.machine.detail)
        self._wake.set()
        return step

    async def run(self) -> list[HopAction]:
        """Run the hop to its end; return the run-level actions (settle, checkpoint, publish, stop) in order."""
        finals: list[HopAction] = []
        try:
            known, self.lane.model_digest = self.lane.model_digest, None
            self.model_before = known or self.lane.measure_model()
            self.mark("model_measure")
            # The grant takes the fleet's next epoch (one counter across lanes), in the
            # same step as the machine grants: no other lane can take an epoch between.
            self.orch.align_epoch(self.lane.token)
            self.feed(Begin(self.rt.clock.time(), self.model_before))
            while self._queue or not self.machine.done:
                if not self._queue:
                    await self._wait()
                    continue
                action = self._queue.popleft()
                if isinstance(action, RUN_ACTIONS):
                    finals.append(action)
                    continue
                event = await self._do[type(action)](action)
                if event is not None:
                    self.feed(event)
        except BaseException as exc:  # cancelled (shutdown, Ctrl-C) or a bug: never leave the hop half done
            await self._unwind(f"hop interrupted: {type(exc).__name__}")
            raise
        self._fill_result()
        return finals

    def mark(self, phase: str) -> None:
        """Note that ``phase`` of this hop ended now (see :mod:`gtbus.nodes.hop_phases`); the result carries it."""
        self.clock.mark(phase)
        self.result.phases = self.clock.as_dict()

    async def _wait(self) -> None:
        """Wait for a message from the network, or the lease."""
        self._wake.clear()
        at = self.machine.wake_at
        if at is None:
            raise ProtocolError(f"hop {self.machine.epoch}: nothing to do and nothing to wait for in phase {self.machine.phase.value}")
        delay = at - self.rt.clock.time()
        if delay > 0:
            # asyncio.timeout, not wait_for: wait_for swallows a cancellation that lands
            # as the wake-up does (Python 3.11), and a cancelled run must unwind.
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
                return
            except TimeoutError:
                pass
        self.feed(LeaseExpired(self.rt.clock.time()))

    async def _unwind(self, reason: str) -> None:
        # Work the machine has not asked for yet is dropped; the epilogue it decided
        # (revokes, scrub) runs. A machine that already decided ignores the abort.
        pending = list(self._queue)
        self._queue.clear()
        step = self.machine.handle(Aborted(reason))
        self._queue.extend(step.actions if step.verdict.accepted else pending)
        while self._queue:
            action = self._queue.popleft()
            if not isinstance(action, RUN_ACTIONS):
                event = await self._do[type(action)](action)
                if event is not None:
                    self._queue.extend(self.machine.handle(event).actions)

    def _fill_result(self) -> None:
        m, r = self.machine, self.result
        r.epoch = m.epoch
        r.outcome = m.outcome.value if m.outcome is not None else "pending"
        r.detail = m.detail
        if m.returned is not None:
            r.nbytes, r.segments = m.returned.nbytes, m.returned.segments
        if m.trained is not None:
            t = m.trained
            r.loss_first, r.loss_last, r.eval_before, r.eval_after = t.loss_first, t.loss_last, t.eval_before, t.eval_after

    # -- actions ----------------------------------------------------------------------------

    async def _new_epoch(self, act: NewEpoch) -> None:
        self.orch.epochs.reserve(act.epoch)
        self.orch.note_epoch(act.epoch)
        self.orch.raise_fence()
        self.orch.hop_started = self.lane.hop_started = self.rt.clock.time()
        self.mark("epoch_reserve")
        return None

    async def _send_grant(self, act: SendGrant) -> HopEvent:
        g, params = act.grant, self.params
        assert params is not None
        sealed = self.sealed_params or seal_params(params, self.rt.roster[g.holder].x25519)
        self.mark("seal_params")
        report = self.orch.report(params.key, g.epoch, self.model_before, lane=self.lane)
        self.mark("report_sign")
        msg = TokenGrant(
            token_id=g.token_id,
            run_id=self.orch.run_id,
            holder=g.holder,
            chunk_index=act.chunk,
            mode=self.cfg.mode,
            lease_deadline=g.deadline,
            sealed_params=sealed,
            report=report,
        )
        try:
            if act.via is not None:
                # A remote holder writes through the device agent on this host: the
                # agent must hold the staging mapping before the holder streams.
                await self._stage_on_agent(act.via, g.token_id, g.epoch, g.holder)
            await self.rt.send(msg, g.holder, epoch=g.epoch)
        except TransportError as exc:  # not connected (killed, partitioned, reconnecting)
            return Undelivered(str(exc))
        self.mark("grant_sent")
        self.orch.prepare_next_hop(self.lane)  # while this holder works and we wait
        return Delivered()

    async def _stage_on_agent(self, agent: str, token_id: str, epoch: int, holder: str) -> None:
        sealed = seal_bytes(str(self.handle).encode(), self.rt.roster[agent].x25519)
        try:
            acc = await self.rt.request(AgentStage(token_id, holder, sealed, self.staging.nbytes, self.cfg.segment), agent, timeout=self.cfg.lease, epoch=epoch)
        except asyncio.TimeoutError:
            raise TransportError(f"device agent {agent} did not answer the stage") from None
        if not isinstance(acc.message, AgentReady) or acc.message.token_id != token_id:
            raise TransportError(f"device agent {agent} refused the stage: {getattr(acc.message, 'reason', acc.spec.name)}")

    async def _publish_state(self, act: PublishTokenState) -> None:
        await self.orch.publish_state(self.lane)
        self.mark("state_published")
        return None

    async def _send_revoke(self, act: SendRevoke) -> None:
        try:
            await self.rt.send(TokenRevoke(self.machine.token.token_id, act.reason), act.to, epoch=self.machine.epoch)
        except GtbusError as exc:  # it may be dead: that is why the token is taken back
            self.log.info("revoke not delivered to %s: %s", act.to, exc)
        return None

    async def _open_segments(self, act: OpenSegments) -> HopEvent:
        t1 = time.perf_counter()
        if self.orch.tamper_hook:
            self.orch.tamper_hook(self.lane, self.a, "during")
        params = self.params
        assert params is not None
        ctx = SegmentContext(self.orch.run_id, act.epoch, act.holder, act.segments)
        try:
            if self.staging is not None:
                # Plaintext lands in a private buffer that was never exported. The
                # staging holds only this holder's ciphertext and is never read again:
                # it is scrubbed and revoked in the epilogue, after training, not on
                # the way to the plaintext (before any later grant all the same).
                self.device.open_segments(self.staging, self.data, params, ctx, act.segments, act.nbytes)
            else:
                self._open_shipped(params, ctx, act.segments, act.nbytes)
        except (ChannelError, DeviceError) as exc:
            return SegmentsRefused(str(exc))
        self.result.open_s = time.perf_counter() - t1
        self.mark("open")
        return SegmentsOpened()

    def _open_shipped(self, params: ChannelParams, ctx: SegmentContext, segments: int, nbytes: int) -> None:
        # Conventional path: every segment was decrypted on the CPU as it arrived and
        # copied on to the device (ship_receiver); only the last ones are waited for here.
        if self.shipping is None:
            raise ChannelError("no shipped segment arrived")
        self.shipping.finish(ctx, segments, nbytes)

    def store_shipped(self, index: int, blob: Any) -> None:
        """Start decrypting a shipped segment the machine accepted (index and size checked) into the device buffer."""
        if self.shipping is None:
            assert self.params is not None and isinstance(self.lane.ship_buf, BounceSet)
            m = self.machine
            ctx = SegmentContext(self.orch.run_id, m.epoch, self.a.holder, m.expected_segments)
            self.shipping = ShipReceiver(self.params, ctx, m.chunk_bytes, self.device, self.data, self.lane.ship_buf)
        self.shipping.accept(index, blob)

    async def _remeasure(self, act: Remeasure) -> HopEvent:
        model_now = self.lane.measure_model()
        self.mark("remeasure")
        return Remeasured(model_now, first_change(self.orch.loaded_code, loaded_code(self.trainer, self.device)))

    async def _train(self, act: Train) -> HopEvent:
        tokens = self.device.as_array(self.data, numpy.uint16)[: act.nbytes // TOKEN_BYTES]
        # While this hop trains, the next hop's fresh staging is allocated beside it.
        self.lane.staging.prepare_next(0 if self.staging is None else self.cfg.staging_bytes)
        r = self.result
        wave, lane = self.orch.wave, self.lane.index

        def work() -> tuple[float, TrainReport, float, tuple[float, float, float, float]]:
            with self.device.active():  # cupy: this lane's GPU, on whichever thread trains it
                t2 = time.perf_counter()
                before = self.trainer.evaluate(tokens)
                t3 = time.perf_counter()
                if wave is None:
                    report = self.trainer.train_on(tokens, self.cfg.steps_per_hop)
                else:
                    # A lockstep member: each step waits for its wave mates' gradients. It leaves as
                    # soon as its own steps are done (or fail), so that they go on without it.
                    try:
                        report = self.trainer.train_on(tokens, self.cfg.steps_per_hop, grad_sync=wave.member(lane))
                    except BaseException:
                        wave.leave(lane, finished=False)
                        raise
                    wave.leave(lane, finished=True)
                t4 = time.perf_counter()
                after = self.trainer.evaluate(tokens)
                return before, report, after, (t2, t3, t4, time.perf_counter())

        try:
            if self._trains_off_loop():
                before, report, after, (t2, t3, t4, t5) = await self._off_loop(work)
            else:
                before, report, after, (t2, t3, t4, t5) = work()
        except GtbusError as exc:
            return TrainingRefused(str(exc))
        r.train_s, r.eval_s = t4 - t3, (t3 - t2) + (t5 - t4)
        self.mark("train")
        self.orch.note_eval(before)
        # The manifest's chain of model digests: this hop's model before (taken for the grant) and after.
        returned = self.machine.returned
        assert returned is not None  # Train follows only an accepted return
        model_after = self.lane.measure_model()
        self.orch.provenance.trained(self.machine.epoch, returned.commitment, self.model_before, model_after)
        self.lane.model_digest = model_after
        self.mark("model_after")
        return Trained(report.loss_first, report.loss_last, before, after)

    def _trains_off_loop(self) -> bool:
        # A fleet on the host backend trains each lane on a worker thread: numpy's kernels
        # release the GIL, so lanes train side by side and the event loop keeps serving the
        # other lanes' grants and returns meanwhile. Only this lane's replica and buffers are
        # touched there (a merge or a fleet checkpoint waits until no lane has a hop in flight).
        # One lane trains on the loop as it always did, and so do GPU lanes sharing one GPU
        # (their kernels run asynchronously all the same). Lanes on different GPUs train on
        # their own threads, each with its GPU current (work() enters device.active()): on
        # the loop's thread each hop's evaluation would wait for its GPU, and K GPUs would
        # train one after another. Lanes in lockstep always do: a wave's barrier on the
        # loop's thread would stop the loop that delivers the other members' returns.
        if len(self.orch.lanes) < 2:
            return False
        if self.device.array_module is numpy or self.orch.wave is not None:
            return True
        return spans_gpus([device_gpu(lane.device) for lane in self.orch.lanes])

    async def _off_loop(self, work: Callable[[], _T]) -> _T:
        # The lane's own thread, not asyncio's shared pool: K lockstep members wait for each
        # other at every step, and a pool smaller than K would leave a member no thread to reach it.
        task = asyncio.get_running_loop().run_in_executor(self.orch.lane_thread(self.lane), work)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The thread cannot be stopped: the hop unwinds (scrubs its buffer) only after it returns.
            await asyncio.wait([task])
            raise

    async def _restore_model(self, act: RestoreModel) -> None:
        self.orch.restore_model(self.lane)
        return None

    def _scrub_verified(self, buf: Any) -> None:
        self.device.scrub(buf)
        if not self.device.verify_zero(buf):
            raise DeviceError("hop buffer did not read zero after scrub")

    async def _scrub(self, act: Scrub) -> HopEvent:
        t = time.perf_counter()
        try:
            self._epilogue()
        except DeviceError as exc:
            return Scrubbed(False, str(exc))
        finally:
            self.result.epilogue_s = time.perf_counter() - t
            self.mark("scrub")
        return Scrubbed()

    def _epilogue(self) -> None:
        staging, data = self.staging, self.data
        # No shipped segment may still be decrypting into the buffer about to be scrubbed.
        bounces_zero = self.shipping is None or self.shipping.close()
        self.params = None  # the key goes with the params object; nothing else holds it
        if staging is not None:
            try:
                self._scrub_verified(staging)
            finally:
                self.lane.staging.release_staging(staging, str(self.handle))
                self.staging = None
        # The private buffer was never exported: once scrubbed and verified zero it
        # serves the next hop (a fresh one costs a page fault per 4 KiB on the host).
        try:
            self._scrub_verified(data)
        except DeviceError:
            self.device.release(data)
            raise
        self.lane.staging.keep_private(data)
        if not bounces_zero:
            raise DeviceError("ship bounce buffers did not read zero after scrub")
