"""The simulated orchestrator: the real hop, token, schedule and admission machines, and a shell.

The decisions are the real sans-I/O machines': :class:`HopMachine` (one hop:
grant, ack/return/decline/lease, open, re-measure, train, scrub, settle),
:class:`TokenMachine` (who owns the token, fencing), :class:`Schedule`
(which chunk next, retries, deferrals), :class:`Enrolment` (who may join,
with which data), :class:`HolderLiveness` (backoff, absence). This
shell does what they say as the real orchestrator's does, on the simulated
network and device: it reserves epochs on disk, exports a fresh staging
buffer and key per grant (staged on the device agent first for a remote
holder), times the lease on its own clock, and feeds the answers back. With
one lane in travel mode it prepares the next hop as the real one does
(:mod:`gtbus.nodes.hop_prepare`): right after a grant, the staging and key of
the hop :meth:`FleetSchedule.likely_next` names go to that holder (not behind
a device agent), the grant that matches uses them, and a wrong guess is
scrubbed and released unused.

Its disk (:class:`OrchestratorDisk`) survives a crash: the epoch reservation,
the list of in-flight staging exports, the checkpoint. A restart resumes from
it, as ``--resume`` does.

A fleet (``gtbus sim --gpus K``) has K lanes, each its own token machine,
device (replica) and hop in flight, handed work by the real
:class:`FleetSchedule`. The shell keeps the rules :mod:`gtbus.protocol.fleet`
and the real orchestrator state: one epoch counter for all lanes; messages go
to the lane whose token id they carry; a device agent stages one lane's hop
at a time (remote holders behind one agent take turns); every ``merge_every`` trained hops no
new hop starts until none is in flight (with ``lockstep``, hops start in waves,
:attr:`FleetSchedule.waves`, and a merge follows every wave that trained: the
per-step gradient exchange within a wave is not simulated, its models are
digests; the waves and the invariants per GPU are), then the replicas are averaged and,
with K > 1, only then is the checkpoint written (and at a round's end, and
when the run stops or ends). A chunk whose training is thrown away goes back
into its round, untrained (:meth:`FleetSchedule.reopen`): a hop that rolls
back restores its lane's replica from the checkpoint (with K > 1 the last
merge) and reopens what that lane trained since; a lane whose GPU fails is
retired, as the real orchestrator does: its hop in flight is unwound (revoke,
scrub, key dropped) and put back, its replica takes no part in merges, and
what it trained since the last merge is reopened too. Each such training is
counted (:attr:`SimOrchestrator.requeued`); with every lane failed the run
stops with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from gtbus.gpu.channel import TAG_SIZE, segment_count
from gtbus.messages.registry import REGISTRY, RejectedMessage, body_from_wire
from gtbus.nodes.hop_prepare import PrepareCounts
from gtbus.protocol.admission import RunShape
from gtbus.protocol.enrolment import Enrolment, Refused
from gtbus.protocol.liveness import HolderLiveness, WhileAway
from gtbus.protocol.fleet import FleetSchedule
from gtbus.protocol.schedule import Assignment, Schedule
from gtbus.protocol.hop import (
    Acked,
    Begin,
    Checkpoint,
    Declined,
    Delivered,
    HopAction,
    HopEvent,
    HopMachine,
    HopOutcome,
    LeaseExpired,
    NewEpoch,
    OpenSegments,
    PublishRecord,
    PublishTokenState,
    Remeasure,
    Remeasured,
    RestoreModel,
    Returned,
    Scrub,
    Scrubbed,
    SegmentsOpened,
    SegmentShipped,
    SegmentsRefused,
    SendGrant,
    SendRevoke,
    Settle,
    Settlement,
    StopRun,
    Train,
    Trained,
    Undelivered,
)
from gtbus.protocol.token import TokenMachine
from gtbus.testing.sim.config import AGENT, CHUNK_TOKENS, OBSERVER, ORCHESTRATOR, SEGMENT_BYTES, TOKEN_BYTES, SimConfig
from gtbus.testing.sim.device import INITIAL_MODEL, Opened, Segment, SimDevice, Staging, merged_model
from gtbus.testing.sim.invariants import InvariantChecker
from gtbus.testing.sim.world import Envelope, World

EPOCH_BLOCK = 64  # as the real orchestrator reserves epochs on disk
RUN_SHAPE = RunShape(chunk_tokens=CHUNK_TOKENS, max_chunks=64, vocab=256)
# The wire types of what a holder sends about the token, by the simulation's kind.
_SPECS = {"ack": REGISTRY["token.ack"], "return": REGISTRY["token.return"], "decline": REGISTRY["token.decline"],
          "ship-segment": REGISTRY["ship.segment"]}


@dataclass(frozen=True, slots=True)
class GrantBody:
    """A grant as the simulation carries it: the real one's fields, the key and handle unsealed."""

    token_id: str
    holder: str
    chunk_index: int
    lease_deadline: float
    key: int  # sealed to the holder in the real grant
    staging: int  # the staging handle, likewise ("ship" mode: a handle nobody can map)
    mode: str = "travel"


@dataclass
class OrchestratorDisk:
    """What survives the orchestrator's process: epoch reservation, in-flight exports, checkpoint."""

    reserved_epoch: int = 0
    inflight: set[int] = field(default_factory=set)
    checkpoint: dict[str, Any] | None = None


@dataclass
class _Hop:
    """The shell's side of one hop: the machine, and what the shell holds for it."""

    machine: HopMachine
    model_before: int | None
    lane: "_Lane"
    staging: Staging | None = None
    grant: GrantBody | None = None
    opened: Opened | None = None
    waiting_agent: bool = False


@dataclass(eq=False)
class _Lane:
    """One GPU token of the fleet: its index, device (replica), token machine and hop in flight."""

    index: int
    device: SimDevice
    token: TokenMachine
    hop: _Hop | None = None
    failed: str | None = None  # why the lane was retired (its GPU failed); None while it serves
    wave: int = 0  # the dispatch pass its hop in flight started in (lockstep: a wave is one pass)
    trained: list[tuple[int, str, int]] = field(default_factory=list)  # what its replica trained that the checkpoint lacks
    # The next hop made while this one runs (gtbus.nodes.hop_prepare): (holder, chunk, its staging).
    prepared: tuple[str, int, Staging] | None = None


class SimOrchestrator:
    """The orchestrator node of the simulation."""

    name = ORCHESTRATOR
    #: Keep the admitted datasets (token count, digest) in the checkpoint and hand them to
    #: the resumed Enrolment (``known``), as the shipped orchestrator does
    #: (:mod:`gtbus.nodes.run_checkpoint`). :class:`ForgetfulResume` forgets them, as the
    #: shipped one did before seed 725, and the simulator catches it.
    checkpoint_datasets = True

    def __init__(
        self,
        world: World,
        cfg: SimConfig,
        device: SimDevice,
        checker: InvariantChecker,
        disk: OrchestratorDisk,
        *,
        token_factory: Callable[..., TokenMachine] = TokenMachine,
        schedule_factory: Callable[..., Schedule] = Schedule,
        hop_factory: Callable[..., HopMachine] = HopMachine,
        fleet_factory: Callable[..., FleetSchedule] = FleetSchedule,
        devices: list[SimDevice] | None = None,
    ) -> None:
        self.world = world
        self.cfg = cfg
        self.device = device  # lane 0's
        self.devices = devices or [device]
        self.fleet_factory = fleet_factory
        self.checker = checker
        self.disk = disk
        self.token_factory = token_factory
        self.schedule_factory = schedule_factory
        self.hop_factory = hop_factory
        self.up = False
        self.incarnation = 0
        self.finished = False
        self.stopped: str | None = None
        self.hops: list[tuple[int, str]] = []  # (epoch, outcome) of this incarnation
        self.lane_hops = [0] * len(self.devices)  # settled hops per lane, every incarnation
        self.prepares = PrepareCounts()  # hops prepared ahead, every incarnation
        # A fault may kill the process between two actions of a hop (after the epoch is
        # reserved and before the grant, after training and before the checkpoint, ...).
        self.crash_countdown = 0
        self.crash_hook: Callable[[], None] | None = None

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or restart with --resume): reservation, leftover exports, checkpoint."""
        w, disk = self.world, self.disk
        self.up = True
        self.incarnation += 1
        self.lanes = [_Lane(k, d, self.token_factory(f"t{w.fresh_id()}", last_epoch=disk.reserved_epoch)) for k, d in enumerate(self.devices)]
        self.epoch = disk.reserved_epoch  # the fleet's epoch counter: the highest issued (or reserved before this process)
        self.reserved_upto = self.epoch
        for sid in sorted(disk.inflight):  # _discard_inflight
            for d in self.devices:
                d.discard_export(sid)
        disk.inflight.clear()
        self.fleet: FleetSchedule | None = None
        self.schedule: Schedule | None = None
        self.trained_since_merge = 0
        self.passes = 0  # dispatch passes that handed out hops
        ck = disk.checkpoint
        self.datasets: dict[str, tuple[int, str]] = {}
        #: Trainings thrown away with a replica (rolled back or retired) and put back into their round, this incarnation.
        self.requeued: list[tuple[int, str, int]] = []
        if ck is not None:
            if ck["schedule"]:
                self.fleet = FleetSchedule.from_state(ck["schedule"], waves=self.cfg.lockstep)
                self.schedule = self.fleet.schedule
            if self.checkpoint_datasets:
                self.datasets = dict(ck["datasets"])
            self.epoch = max(self.epoch, ck["epoch"])
            for d in self.devices:
                d.restore(ck["model"])
        else:
            for d in self.devices:
                d.restore(INITIAL_MODEL)
            self.checker.scheduled({})  # no checkpoint: a new run, whatever data its holders bring
        self.enrolment = Enrolment(self.cfg.holders, known=self.datasets)
        self.running = False
        cfg = self.cfg
        self.liveness = HolderLiveness(cfg.backoff_min, cfg.backoff_max, cfg.absent_timeout)
        self.last_heard: dict[str, float] = {}
        self.followers: set[str] = set()
        self.code_changed: str | None = None  # a fault may change the loaded code; a new process loads it afresh
        w.release_held(self.name)
        w.note("orchestrator started", (self.incarnation, self.epoch))
        self._hello(self.incarnation)
        w.on_node(self.name, self.cfg.register_timeout, self._register_deadline, self.incarnation)

    def crash(self) -> None:
        """kill -9: the process and its keys and model are gone; the disk stays."""
        self.up = False
        for d in self.devices:
            d.process_died()
        self.world.hold_while_down(self.name)
        self.world.note("orchestrator crashed")

    def exit(self) -> None:
        """The process exits after the run stopped with a reason: its keys and model go with it
        (a fleet's other lanes may have had hops in flight); the disk stays. Nothing of it runs until a restart."""
        self.up = False
        for d in self.devices:
            d.process_died()

    def resume_after_stop(self) -> None:
        """An operator runs ``gtbus orchestrator --resume`` after the run stopped with a reason."""
        self.crash()  # the stopped process has exited: its keys and model are gone
        self.stopped = None
        self.start()

    def _live(self, inc: int) -> bool:
        return self.up and inc == self.incarnation and not self.finished and self.stopped is None

    def _hello(self, inc: int) -> None:
        # Holders (re-)register when they hear of a new orchestrator process: said until all have.
        if not self._live(inc) or self.running:
            return
        for n in [*self.cfg.holders, *([AGENT] if self.cfg.via_agent else [])]:
            self.world.send(self.name, n, "hello", inc)
        self.world.on_node(self.name, 1.0, self._hello, inc)

    def _register_deadline(self, inc: int) -> None:
        if self._live(inc) and not self.running:
            missing = self.enrolment.missing()
            self._stop(f"nodes did not register within {self.cfg.register_timeout:.0f}s: {', '.join(missing)}")

    def _stop(self, reason: str) -> None:
        self.stopped = reason
        self.world.note("orchestrator stopped", reason)
        for n in self.cfg.holders:
            self.world.send(self.name, n, "shutdown", reason)

    # -- messages ------------------------------------------------------------------------------

    def receive(self, env: Envelope) -> None:
        """Dispatch one delivered message by kind (the registry's job in the real node)."""
        self.last_heard[env.src] = self.world.now
        handler = self._handlers.get(env.kind)
        if handler is not None and not self.finished and self.stopped is None:
            handler(self, env)

    def _on_register(self, env: Envelope) -> None:
        scheduled = self.schedule.chunks if self.schedule is not None else None
        verdict = self.enrolment.register(env.src, self.world.roles.get(env.src), env.body, RUN_SHAPE, scheduled=scheduled, agents={AGENT})
        if isinstance(verdict, Refused):
            self.world.note("registration refused", (env.src, verdict.code))
            self.world.send(self.name, env.src, "refusal", verdict.code)
            return
        if verdict.manifest is not None:
            self.checker.admitted(env.src, verdict.manifest.total_tokens, verdict.manifest.digest)
        self.world.send(self.name, env.src, "welcome", self.incarnation)
        if not self.running and self.enrolment.complete:
            self.running = True
            if self.schedule is None:
                manifests = self.enrolment.manifests
                self.schedule = self.schedule_factory(
                    {h: manifests[h].chunk_count for h in self.cfg.holders}, self.cfg.rounds, max_attempts=self.cfg.max_attempts
                )
                self.fleet = self.fleet_factory(self.schedule, len(self.lanes), waves=self.cfg.lockstep)
                self.datasets = {h: (m.total_tokens, m.digest) for h, m in manifests.items()}
                self.checker.scheduled(dict(self.datasets))
            self._next_hop(self.incarnation)

    def _on_snapshot_request(self, env: Envelope) -> None:
        self.followers.add(env.src)
        self.world.send(self.name, env.src, "snapshot", (self.epoch, self.lanes[0].token.phase.value))

    def _decoded(self, env: Envelope, kind: str, body: Any) -> Any:
        # The receive pipeline: a body with a field of the wrong type, a missing or an extra
        # field is refused before any handler runs (what body_from_wire does to the wire map).
        if isinstance(body, dict):
            try:
                return body_from_wire(_SPECS[kind], body)
            except RejectedMessage as exc:
                self.world.note("refused body", (kind, env.src, str(exc)[:60]))
                return None
        return body

    def _hop_of(self, token_id: str) -> _Hop | None:
        """The hop in flight of the lane whose token id a message carries (None: no lane's, or that lane is idle)."""
        for lane in self.lanes:
            if lane.token.token_id == token_id:
                return lane.hop
        self.world.note("hop ignored", f"unknown token {str(token_id)[:16]!r}")
        return None

    def _on_ship_segment(self, env: Envelope) -> None:
        body = env.body
        if not isinstance(body, tuple) or len(body) != 3:
            return
        shipped, seg, size = body
        shipped = self._decoded(env, "ship-segment", shipped)
        hop = self._hop_of(shipped.token_id) if shipped is not None else None
        if hop is None:
            return
        # The blob's length is what the real node measures; the machine checks index, count and size.
        event = SegmentShipped(env.src, env.epoch, shipped.token_id, shipped.index, shipped.count, size)
        if self._drive(hop, event) and hop.staging is not None and isinstance(seg, Segment):
            hop.staging.segments[shipped.index] = seg
            hop.staging.scrubbed = False

    def _on_token_message(self, env: Envelope) -> None:
        msg = self._decoded(env, env.kind, env.body)
        hop = self._hop_of(msg.token_id) if msg is not None else None
        if msg is None or hop is None:
            return  # between hops the token is idle: nothing a holder says about it counts
        if env.kind == "ack":
            event: HopEvent = Acked(env.src, env.epoch, msg.token_id)
        elif env.kind == "return":
            event = Returned(env.src, env.epoch, msg.token_id, msg.chunk_index, msg.segments, msg.nbytes, msg.chunk_commitment)
        else:
            event = Declined(env.src, env.epoch, msg.token_id, msg.reason)
        self._drive(hop, event)


    # -- the run loop --------------------------------------------------------------------------

    def _next_hop(self, inc: int) -> None:
        """Hand every idle lane its next hop; with none in flight, merge when due, finish, or wait for a holder."""
        if not self._live(inc):
            return
        fleet = self.fleet
        assert fleet is not None
        live = self._live_lanes()
        busy = any(lane.hop is not None for lane in live)
        if self._merge_due():
            if busy:
                return  # no new hop until the replicas are merged: the last hop to end comes back here
            if len(self.lanes) > 1:
                self._merge()  # it checkpoints
            else:
                self._save_checkpoint()
        started = False
        self.passes += 1
        wave = self.passes
        may_start = fleet.may_start  # in waves: this pass starts a wave, only while none is in flight
        for lane in live:
            if may_start and lane.hop is None and self._live(inc):
                a = fleet.next_for(lane.index, self._can_stage)
                if a is not None:
                    started = True
                    if self.cfg.lockstep:
                        self.checker.wave_started(lane.index, wave, [other.wave for other in live if other.hop is not None])
                    lane.wave = wave
                    self._start_hop(lane, a)
        if started or busy or not self._live(inc):
            return
        if fleet.finished:
            if len(self.lanes) > 1:
                self._merge()
            for lane in self.lanes:
                if lane.prepared is not None:  # a guess no hop took: released as the run ends
                    self.prepares.discarded += 1
                    self._release_staging(lane.device, lane.prepared[2])
                    lane.prepared = None
            self.finished = True
            self.world.note("run complete", len(self.hops))
            for n in [*self.cfg.holders, *sorted(self.followers)]:
                self.world.send(self.name, n, "complete", None)
            return
        self._wait_for_a_holder(inc)

    def _align_epoch(self, lane: _Lane) -> None:
        """One epoch counter for the fleet: the lane's token takes the next epoch of any lane's."""
        lane.token.epoch = max(lane.token.epoch, self.epoch)

    def _merge_due(self) -> bool:
        # Every merge_every trained hops; and at a round's end while a replica holds training the
        # checkpoint lacks, so that what a rollback or a retirement reopens is of the current round.
        if len(self.lanes) > 1 and self.trained_since_merge >= (1 if self.cfg.lockstep else self.cfg.merge_every):
            return True
        fleet = self.fleet
        return fleet is not None and fleet.round_settled and not fleet.finished and any(lane.trained for lane in self._live_lanes())

    def _live_lanes(self) -> list[_Lane]:
        return [lane for lane in self.lanes if lane.failed is None]

    def _merge(self) -> None:
        """Average the live replicas into every live lane (no hop is in flight), then checkpoint the one model."""
        live = self._live_lanes()
        replicas = [lane.device.measure() for lane in live]
        model = merged_model([m for m in replicas if m is not None])
        self.checker.merged([m for m in replicas if m is not None], model)
        for lane in live:
            lane.device.restore(model)
            lane.trained = []
        self.world.note("merge", (self.trained_since_merge, model))
        self.trained_since_merge = 0
        self._save_checkpoint()

    def _can_stage(self, holder: str) -> bool:
        """Reachable, and (a remote holder) its device agent stages no other lane's hop: an agent stages
        one hop at a time (a stage request replaces the one before), so two lanes through one agent
        would revoke each other's hops."""
        via = self.enrolment.manifests[holder].via
        if via is not None and any(lane.hop is not None and lane.hop.machine.via == via for lane in self.lanes):
            return False
        return self._reachable(holder)

    def _reachable(self, holder: str) -> bool:
        return self.liveness.reachable(holder, self.world.now, self.last_heard.get(holder, -1.0))

    def _wait_for_a_holder(self, inc: int) -> None:
        if not self._live(inc):
            return
        assert self.fleet is not None
        waiting = self.fleet.pending_holders()
        decision = self.liveness.while_away(waiting, self.cfg.holders, self.world.now, self.last_heard)
        if decision is WhileAway.GO_ON:
            self._next_hop(inc)
        elif decision is WhileAway.GIVE_UP:
            for h in waiting:
                self.fleet.give_up(h)
            self._next_hop(inc)
        elif decision is WhileAway.STOP:
            if len(self.lanes) > 1:
                self._merge()  # it checkpoints
            else:
                self._save_checkpoint()
            self._stop(f"no holder was reachable for {self.cfg.absent_timeout:.0f}s ({', '.join(waiting)} have work left)")
        else:
            self.world.on_node(self.name, min(0.05, self.cfg.backoff_min), self._wait_for_a_holder, inc)

    # -- one hop: the real HopMachine decides, this shell does --------------------------------

    def _start_hop(self, lane: _Lane, a: Assignment) -> None:
        manifest = self.enrolment.manifests[a.holder]
        chunk_bytes = manifest.chunk_tokens_of(a.chunk, CHUNK_TOKENS) * TOKEN_BYTES
        self._align_epoch(lane)
        machine = self.hop_factory(lane.token, a, chunk_bytes=chunk_bytes, segment_size=SEGMENT_BYTES, lease=self.cfg.lease,
                                   ship=self.cfg.mode == "ship", via=manifest.via)
        hop = _Hop(machine, lane.device.measure(), lane)
        lane.hop = hop
        self._drive(hop, Begin(self.world.clock(self.name), _digest(hop.model_before)))

    def _drive(self, hop: _Hop, event: HopEvent) -> bool:
        """Feed one event to the hop's machine and do what it says, in order (answers are fed back at once); whether it counted."""
        step = hop.machine.handle(event)
        if not step.verdict.accepted:
            self.world.note("hop ignored", (type(event).__name__, step.verdict.reason[:60]))
        for action in step.actions:
            if self.crash_countdown and self.crash_hook is not None:
                self.crash_countdown -= 1
                if not self.crash_countdown:
                    self.world.note("fault: crash before", type(action).__name__)
                    self.crash_hook()
            if hop.lane.hop is not hop or not self.up:
                break  # the process died, or the hop ended, while executing
            answer = self._do(hop, action)
            if answer is not None:
                self._drive(hop, answer)
        if hop.machine.done and hop.lane.hop is hop:
            hop.lane.hop = None
            self.world.on_node(self.name, 0.002, self._next_hop, self.incarnation)
        return step.verdict.accepted

    def _do(self, hop: _Hop, action: HopAction) -> HopEvent | None:
        m, w, device, token = hop.machine, self.world, hop.lane.device, hop.lane.token
        if isinstance(action, NewEpoch):
            self.epoch = max(self.epoch, action.epoch)
            self._reserve_epoch(action.epoch)
        elif isinstance(action, SendGrant):
            return self._send_grant(hop, action)
        elif isinstance(action, PublishTokenState):
            self._publish("token-state", (token.epoch, token.owner, token.phase.value))
        elif isinstance(action, SendRevoke):
            w.send(self.name, action.to, "revoke", token.token_id, m.epoch)
        elif isinstance(action, OpenSegments):
            assert hop.staging is not None
            # As the shell does: the staging is scrubbed and revoked in the epilogue, after training.
            opened = device.open_segments(hop.staging, hop.staging.key, action.epoch, action.holder, action.segments)
            if isinstance(opened, str):
                return SegmentsRefused(opened)
            hop.opened = opened
            return SegmentsOpened()
        elif isinstance(action, Remeasure):
            return Remeasured(_digest(self._measured(hop)), self.code_changed)
        elif isinstance(action, Train):
            assert hop.opened is not None
            a = m.assignment
            device.train(hop.opened, (a.round, a.holder, a.chunk))
            return Trained()
        elif isinstance(action, RestoreModel):
            self._restore_model(hop)
        elif isinstance(action, Scrub):
            self._epilogue(hop)
            return Scrubbed()
        elif isinstance(action, Settle):
            self._settle(hop, action.outcome, action.settlement)
        elif isinstance(action, Checkpoint) and len(self.lanes) == 1:
            self._save_checkpoint()  # a fleet checkpoints where it merges, its replicas one model
        elif isinstance(action, PublishRecord):
            self._publish("hop", (m.epoch, m.assignment.holder, m.outcome.value if m.outcome else None))
        elif isinstance(action, StopRun):
            self._stop(action.reason)
        return None

    def _measured(self, hop: _Hop) -> int | None:
        """What re-measuring the model reads."""
        return hop.lane.device.measure()

    def _reserve_epoch(self, epoch: int) -> None:
        if epoch > self.reserved_upto:
            self.reserved_upto = epoch + EPOCH_BLOCK - 1
            self.disk.reserved_epoch = self.reserved_upto

    def _send_grant(self, hop: _Hop, action: SendGrant) -> HopEvent | None:
        """Export a fresh staging buffer and key for the grant; stage on the agent first for a remote holder."""
        w, g, device = self.world, action.grant, hop.lane.device
        capacity = segment_count(CHUNK_TOKENS * TOKEN_BYTES, SEGMENT_BYTES)
        prepared = self._take_prepared(hop.lane, g.holder, action.chunk)
        if prepared is not None:
            key, sid = prepared.key, prepared.sid
            device.grant_prepared(prepared, g.epoch, g.holder)
            hop.staging = prepared
        else:
            key, sid = w.fresh_id(), w.fresh_id()
            if device.exports_outlive_process:
                self.disk.inflight.add(sid)  # before the export exists: a crash can always clean up
            hop.staging = device.alloc_staging(sid, g.epoch, g.holder, key, capacity, token=g.token_id)
        if hop.machine.ship:
            # Ship mode: the ciphertext lands in this process's memory, never exported.
            device.revoke_export(hop.staging)
        hop.grant = GrantBody(g.token_id, g.holder, action.chunk, g.deadline, key, sid, self.cfg.mode)
        w.note("grant", (g.epoch, g.holder, hop.machine.assignment.round, action.chunk))
        # The lease runs on this node's clock: its timer fires when that clock reads the deadline.
        w.on_node(self.name, g.deadline - w.clock(self.name), self._lease_check, self.incarnation, hop)
        if action.via is not None:
            hop.waiting_agent = True
            stage = (g.token_id, g.epoch, g.holder, sid, capacity * (SEGMENT_BYTES + TAG_SIZE), SEGMENT_BYTES)
            if not w.send(self.name, action.via, "agent-stage", stage, g.epoch, mandatory=True):
                return Undelivered(f"device agent {action.via} not connected")
            return None
        return self._grant_to_holder(hop)

    def _grant_to_holder(self, hop: _Hop) -> HopEvent:
        assert hop.grant is not None
        if not self.world.send(self.name, hop.grant.holder, "grant", hop.grant, hop.machine.epoch, mandatory=True):
            return Undelivered(f"{hop.grant.holder} not connected")
        if self.cfg.prepare and self.cfg.mode == "travel" and len(self.lanes) == 1:
            # As the orchestrator's prepare_next_hop: soon after the grant, while the holder works.
            self.world.on_node(self.name, 0.0005, self._prepare_next_hop, self.incarnation, hop.lane)
        return Delivered()

    # -- the next hop, ahead (gtbus.nodes.hop_prepare) ----------------------------------------------

    def _prepare_next_hop(self, inc: int, lane: _Lane) -> None:
        """Export the staging of the hop the lane likely runs next to its holder, with its key, before the grant."""
        if not self._live(inc) or lane.prepared is not None or self.fleet is None or lane.failed is not None:
            return
        a = self.fleet.likely_next(lane.index, self._can_stage)
        if a is None or self.enrolment.manifests[a.holder].via is not None:
            return
        w = self.world
        key, sid = w.fresh_id(), w.fresh_id()
        if lane.device.exports_outlive_process:
            self.disk.inflight.add(sid)  # before the export exists, as a grant's
        capacity = segment_count(CHUNK_TOKENS * TOKEN_BYTES, SEGMENT_BYTES)
        staging = lane.device.alloc_staging(sid, 0, a.holder, key, capacity, token=lane.token.token_id, prepared=True)
        lane.prepared = (a.holder, a.chunk, staging)
        self.prepares.made += 1
        w.note("prepared", (a.holder, a.chunk))
        w.send(self.name, a.holder, "prepare", (a.holder, a.chunk, key, sid))

    def _take_prepared(self, lane: _Lane, holder: str, chunk: int) -> Staging | None:
        """The lane's prepared staging if it was made for this holder and chunk; else it is released unused."""
        p, lane.prepared = lane.prepared, None
        if p is None:
            return None
        if (p[0], p[1]) == (holder, chunk):
            self.prepares.used += 1
            return p[2]
        self.prepares.discarded += 1
        self.world.note("prepared discarded", (p[0], p[1]))
        self._release_staging(lane.device, p[2])
        return None

    def _release_staging(self, device: SimDevice, staging: Staging) -> None:
        device.scrub(staging)
        device.release(staging)
        device.drop_key(staging.key)
        self.disk.inflight.discard(staging.sid)

    def _on_ready(self, env: Envelope) -> None:
        hop = self._hop_of(env.body) if isinstance(env.body, str) else None
        if hop is None or not hop.waiting_agent or hop.grant is None or env.body != hop.grant.token_id:
            return
        hop.waiting_agent = False
        self._drive(hop, self._grant_to_holder(hop))

    def _on_refusal(self, env: Envelope) -> None:
        # The device agent could not stage the hop (the real stage request gets a Refusal).
        hop = next((lane.hop for lane in self.lanes if lane.hop is not None and lane.hop.machine.epoch == env.epoch), None)
        if hop is not None and hop.waiting_agent and env.src == hop.machine.via and env.epoch == hop.machine.epoch:
            hop.waiting_agent = False
            self._drive(hop, Undelivered(f"device agent {env.src} refused the stage: {env.body}"))

    def _lease_check(self, inc: int, hop: _Hop) -> None:
        if not self._live(inc) or hop.lane.hop is not hop:
            return
        if hop.waiting_agent:
            # The agent's stage request timed out (the real request's timeout is the lease).
            hop.waiting_agent = False
            self._drive(hop, Undelivered("device agent did not answer the stage"))
            if hop.lane.hop is not hop:
                return
            # The machine did not take it (an early ack moved it on): like the real shell,
            # fall back on the lease.
        self._drive(hop, LeaseExpired(self.world.clock(self.name)))
        wake = hop.machine.wake_at
        if hop.lane.hop is hop and wake is not None:
            # This clock was set back since the grant: look again when it reads the deadline.
            self.world.on_node(self.name, wake - self.world.clock(self.name) + 1e-6, self._lease_check, inc, hop)

    def _restore_model(self, hop: _Hop) -> None:
        # The checkpoint's model (a fleet's: the last merge); what the lane trained since goes back.
        ck = self.disk.checkpoint
        hop.lane.device.restore(ck["model"] if ck is not None else INITIAL_MODEL)
        self._requeue_trained(hop.lane)

    def _requeue_trained(self, lane: _Lane) -> None:
        """``lane``'s replica lost what it trained since the checkpoint: those chunks go back into their round, untrained."""
        assert self.fleet is not None
        thrown, lane.trained = lane.trained, []
        if thrown:
            self.fleet.reopen([Assignment(*key) for key in thrown])
            self.requeued.extend(thrown)
            self.trained_since_merge -= min(self.trained_since_merge, len(thrown))
            self.world.note("requeued", (lane.index, thrown))

    def _epilogue(self, hop: _Hop) -> None:
        """Scrub and release the staging, drop the key."""
        if hop.staging is not None:
            self._release_staging(hop.lane.device, hop.staging)

    def _settle(self, hop: _Hop, outcome: HopOutcome, settlement: Settlement) -> None:
        a = hop.machine.assignment
        assert self.fleet is not None
        if settlement is not Settlement.DEFER:
            self.liveness.reached(a.holder)
        if settlement is Settlement.COMPLETE:
            self.fleet.release(hop.lane.index, "done")
            self.trained_since_merge += 1
            hop.lane.trained.append((a.round, a.holder, a.chunk))
        elif settlement is Settlement.DEFER:
            self.fleet.release(hop.lane.index, "deferred")
            self.liveness.unreached(a.holder, self.world.now)
        else:
            self.fleet.release(hop.lane.index, "failed")
        self.hops.append((hop.machine.epoch, outcome.value))
        self.lane_hops[hop.lane.index] += 1
        self.world.note("hop", (hop.machine.epoch, a.holder, a.chunk, outcome.value, hop.machine.detail[:60]))

    def _save_checkpoint(self) -> None:
        model = self._live_lanes()[0].device.measure()  # a fleet's live replicas are one model here (merged)
        self.checker.checkpointed(model)
        for lane in self._live_lanes():
            lane.trained = []  # the checkpoint holds it (a fleet's: merged)
        self.disk.checkpoint = {
            "epoch": self.epoch,
            "schedule": self.fleet.to_state() if self.fleet else None,
            "model": model,
            "datasets": dict(self.datasets),
        }

    def final_model(self) -> int | None:
        """The run's model: the first live lane's replica (with K > 1 the run ends merged)."""
        live = self._live_lanes() or self.lanes
        return live[0].device.model

    def fail_lane(self, index: int) -> None:
        """Lane ``index``'s GPU failed: retire the lane, unwind and put back its hop; stop when no lane is left."""
        lane = self.lanes[index]
        if not self.up or lane.failed is not None or self.finished or self.stopped is not None or self.fleet is None:
            return
        lane.failed = "device failed"
        self.world.note("lane retired", (index, len(lane.trained)))
        hop = lane.hop
        if hop is not None:
            lane.hop = None
            if hop.grant is not None:
                self.world.send(self.name, hop.grant.holder, "revoke", lane.token.token_id, hop.machine.epoch)
            self._epilogue(hop)
            self.fleet.release(index, "deferred")  # not trained: another lane does it
            self.hops.append((hop.machine.epoch, "aborted"))
        self._retired_training(lane)
        if not self._live_lanes():
            self._stop("every GPU lane failed; the run continues with --resume from the last merge")
        elif self.running:
            self.world.on_node(self.name, 0.002, self._next_hop, self.incarnation)

    def _retired_training(self, lane: _Lane) -> None:
        """What a retired lane's replica trained since the last merge is in no model: reopened, trained again."""
        self._requeue_trained(lane)

    def _publish(self, kind: str, body: Any) -> None:
        self.world.send(self.name, OBSERVER, kind, body)

    _handlers: dict[str, Callable[["SimOrchestrator", Envelope], None]] = {
        "register": _on_register,
        "snapshot-request": _on_snapshot_request,
        "ack": _on_token_message,
        "decline": _on_token_message,
        "return": _on_token_message,
        "ship-segment": _on_ship_segment,
        "agent-ready": _on_ready,
        "refusal": _on_refusal,
    }


class ForgetfulResume(SimOrchestrator):
    """The shipped rule: after a resume, a holder's data is compared with the schedule's chunk count only."""

    checkpoint_datasets = False


def _digest(model: int | None) -> bytes:
    return (model if model is not None else 0).to_bytes(8, "big")
