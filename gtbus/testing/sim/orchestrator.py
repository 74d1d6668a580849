"""The simulated orchestrator: the real token machine, schedule and admission, and the hop's rules.

The decisions are the real sans-I/O machines': :class:`TokenMachine` (who
owns the token, fencing), :class:`Schedule` (which chunk next, retries,
deferrals), :func:`admit` (manifests). The hop itself follows
``gtbus/nodes/orchestrator.py``'s ``Orchestrator.hop`` step for step, as
events instead of awaits: reserve the epoch on disk before the grant leaves,
stage on the agent for a remote holder, grant, wait for the return (or a
decline, or the lease), check the return against the admitted manifest, open
the segments, scrub and revoke the staging, re-measure the model, train; the
epilogue scrubs, releases, drops the key, finishes the token, settles the
schedule and checkpoints.

Its disk (:class:`OrchestratorDisk`) survives a crash: the epoch reservation,
the list of in-flight staging exports, the checkpoint. A restart resumes from
it, as ``--resume`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from gtbus.gpu.channel import segment_count
from gtbus.messages.registry import REGISTRY, RejectedMessage, body_from_wire
from gtbus.messages.types import TokenReturn
from gtbus.protocol.admission import AdmittedManifest, ManifestRefused, RunShape, admit
from gtbus.protocol.schedule import Assignment, Schedule
from gtbus.protocol.token import Phase, TokenMachine
from gtbus.testing.sim.config import AGENT, CHUNK_TOKENS, OBSERVER, ORCHESTRATOR, SEGMENT_BYTES, TOKEN_BYTES, SimConfig
from gtbus.testing.sim.device import INITIAL_MODEL, SimDevice, Staging
from gtbus.testing.sim.invariants import InvariantChecker
from gtbus.testing.sim.world import Envelope, World

EPOCH_BLOCK = 64  # as the real orchestrator reserves epochs on disk
RUN_SHAPE = RunShape(chunk_tokens=CHUNK_TOKENS, max_chunks=64, vocab=256)
# The wire types of what a holder sends about the token, by the simulation's kind.
_SPECS = {"ack": REGISTRY["token.ack"], "return": REGISTRY["token.return"], "decline": REGISTRY["token.decline"]}


class Outcome(str, Enum):
    """How a hop ended (the real orchestrator's outcome strings)."""

    TRAINED = "trained"
    UNDELIVERED = "undelivered"
    DECLINED = "declined"
    REVOKED = "revoked"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled-back"


@dataclass(frozen=True, slots=True)
class GrantBody:
    """A grant as the simulation carries it: the real one's fields, the key and handle unsealed."""

    token_id: str
    holder: str
    chunk_index: int
    lease_deadline: float
    key: int  # sealed to the holder in the real grant
    staging: int  # the staging handle, likewise


@dataclass
class OrchestratorDisk:
    """What survives the orchestrator's process: epoch reservation, in-flight exports, checkpoint."""

    reserved_epoch: int = 0
    inflight: set[int] = field(default_factory=set)
    checkpoint: dict[str, Any] | None = None


@dataclass
class _Hop:
    a: Assignment
    token_id: str
    epoch: int
    deadline: float
    staging: Staging
    key: int
    expect: tuple[int, int]
    model_before: int | None
    via: str | None
    waiting_agent: bool = False


class SimOrchestrator:
    """The orchestrator node of the simulation."""

    name = ORCHESTRATOR
    #: Re-measure the model at the end of every hop, not only before training. The
    #: shipped ``Orchestrator.hop`` (:class:`TrainingOnlyRemeasure`) checks only on the
    #: training path, so a model changed while a holder held the token survives a
    #: hop that ends revoked, declined or rejected, and is checkpointed and trained
    #: on: ``gtbus sim --seed 6 --remeasure before-training``.
    remeasure_every_hop = True

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
    ) -> None:
        self.world = world
        self.cfg = cfg
        self.device = device
        self.checker = checker
        self.disk = disk
        self.token_factory = token_factory
        self.schedule_factory = schedule_factory
        self.up = False
        self.incarnation = 0
        self.finished = False
        self.stopped: str | None = None
        self.hops: list[tuple[int, str]] = []  # (epoch, outcome) of this incarnation

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or restart with --resume): reservation, leftover exports, checkpoint."""
        w, disk = self.world, self.disk
        self.up = True
        self.incarnation += 1
        self.token = self.token_factory(f"t{w.fresh_id()}", last_epoch=disk.reserved_epoch)
        self.reserved_upto = self.token.epoch
        for sid in sorted(disk.inflight):  # _discard_inflight
            self.device.discard_export(sid)
        disk.inflight.clear()
        self.schedule: Schedule | None = None
        ck = disk.checkpoint
        if ck is not None:
            self.schedule = Schedule.from_state(ck["schedule"]) if ck["schedule"] else None
            self.token.epoch = max(self.token.epoch, ck["epoch"])
            self.device.restore(ck["model"])
        else:
            self.device.restore(INITIAL_MODEL)
        self.manifests: dict[str, AdmittedManifest] = {}
        self.agents: set[str] = set()
        self.running = False
        self.hop: _Hop | None = None
        self.away: dict[str, tuple[float, float, float]] = {}
        self.last_heard: dict[str, float] = {}
        self.followers: set[str] = set()
        w.release_held(self.name)
        w.note("orchestrator started", (self.incarnation, self.token.epoch))
        self._hello(self.incarnation)
        w.on_node(self.name, self.cfg.register_timeout, self._register_deadline, self.incarnation)

    def crash(self) -> None:
        """kill -9: the process and its keys and model are gone; the disk stays."""
        self.up = False
        self.device.process_died()
        self.world.hold_while_down(self.name)
        self.world.note("orchestrator crashed")

    def _live(self, inc: int) -> bool:
        return self.up and inc == self.incarnation and not self.finished and self.stopped is None

    def _hello(self, inc: int) -> None:
        # Holders (re-)register when they hear of a new orchestrator process: said until all have.
        if not self._live(inc) or self.running:
            return
        for n in [*self.cfg.holders, *([AGENT] if self.cfg.remote else [])]:
            self.world.send(self.name, n, "hello", inc)
        self.world.on_node(self.name, 1.0, self._hello, inc)

    def _register_deadline(self, inc: int) -> None:
        if self._live(inc) and not self.running:
            missing = sorted(set(self.cfg.holders) - set(self.manifests)) + sorted({AGENT} - self.agents if self.cfg.remote else set())
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
        if env.src == AGENT:
            self.agents.add(AGENT)
        else:
            try:
                self.manifests[env.src] = admit(env.body, RUN_SHAPE, previous=self.manifests.get(env.src))
            except ManifestRefused as exc:
                self.world.note("registration refused", (env.src, exc.code))
                self.world.send(self.name, env.src, "refusal", exc.code)
                return
        self.world.send(self.name, env.src, "welcome", self.incarnation)
        self._maybe_run()

    def _maybe_run(self) -> None:
        if self.running or set(self.cfg.holders) - set(self.manifests):
            return
        if {m.via for m in self.manifests.values() if m.via} - self.agents:
            return
        self.running = True
        if self.schedule is None:
            self.schedule = self.schedule_factory(
                {h: self.manifests[h].chunk_count for h in self.cfg.holders}, self.cfg.rounds, max_attempts=self.cfg.max_attempts
            )
        self._next_hop(self.incarnation)

    def _on_snapshot_request(self, env: Envelope) -> None:
        self.followers.add(env.src)
        self.world.send(self.name, env.src, "snapshot", (self.token.epoch, self.token.phase.value))

    def _token_message(self, env: Envelope) -> Any:
        # The receive pipeline: a body with a field of the wrong type, a missing or an extra
        # field is refused before any handler runs (what body_from_wire does to the wire map).
        body = env.body
        if isinstance(body, dict):
            try:
                return body_from_wire(_SPECS[env.kind], body)
            except RejectedMessage as exc:
                self.world.note("refused body", (env.kind, env.src, str(exc)[:60]))
                return None
        return body

    def _on_ack(self, env: Envelope) -> None:
        msg = self._token_message(env)
        if msg is not None:
            self.token.on_ack(env.src, env.epoch, msg.token_id)

    def _on_decline(self, env: Envelope) -> None:
        msg = self._token_message(env)
        hop = self.hop
        if msg is None or hop is None or hop.waiting_agent:
            return
        if self.token.on_decline(env.src, env.epoch, msg.token_id).accepted:
            self._revoke_holder(hop, Outcome.DECLINED)

    def _on_return(self, env: Envelope) -> None:
        msg = self._token_message(env)
        hop = self.hop
        if msg is None or hop is None or hop.waiting_agent:
            return
        if not self.token.on_return(env.src, env.epoch, msg.token_id).accepted:
            return
        self._returned(hop, msg)

    def _on_ready(self, env: Envelope) -> None:
        hop = self.hop
        if hop is None or not hop.waiting_agent or env.body != hop.token_id:
            return
        hop.waiting_agent = False
        self._send_grant(hop)

    _handlers: dict[str, Callable[["SimOrchestrator", Envelope], None]] = {
        "register": _on_register,
        "snapshot-request": _on_snapshot_request,
        "ack": _on_ack,
        "decline": _on_decline,
        "return": _on_return,
        "agent-ready": _on_ready,
    }

    # -- the run loop --------------------------------------------------------------------------

    def _next_hop(self, inc: int) -> None:
        if not self._live(inc) or self.hop is not None:
            return
        assert self.schedule is not None
        a = self.schedule.next(self._reachable)
        if a is None:
            if self.schedule.finished:
                self.finished = True
                self.world.note("run complete", len(self.hops))
                for n in [*self.cfg.holders, *sorted(self.followers)]:
                    self.world.send(self.name, n, "complete", None)
                return
            self._wait_for_a_holder(inc)
            return
        self._start_hop(a)

    def _reachable(self, holder: str) -> bool:
        away = self.away.get(holder)
        if away is None:
            return True
        failed_at, _, backoff = away
        now = self.world.now
        heard_since = self.last_heard.get(holder, -1.0) > failed_at
        return now >= failed_at + backoff or (heard_since and now >= failed_at + self.cfg.backoff_min)

    def _back_off(self, holder: str) -> None:
        previous = self.away.get(holder)
        now = self.world.now
        if previous is None:
            self.away[holder] = (now, now, self.cfg.backoff_min)
        else:
            self.away[holder] = (now, previous[1], min(previous[2] * 2, self.cfg.backoff_max))

    def _gone(self, holder: str) -> bool:
        away = self.away.get(holder)
        if away is None:
            return False
        quiet_since = max(away[1], self.last_heard.get(holder, -1.0))
        return self.world.now - quiet_since >= self.cfg.absent_timeout

    def _wait_for_a_holder(self, inc: int) -> None:
        if not self._live(inc):
            return
        assert self.schedule is not None
        waiting = self.schedule.pending_holders()
        if any(self._reachable(h) for h in waiting):
            self._next_hop(inc)
            return
        if all(self._gone(h) for h in waiting):
            timeout, now = self.cfg.absent_timeout, self.world.now
            heard = [h for h in self.cfg.holders if now - self.last_heard.get(h, -timeout) < timeout]
            if not heard:
                self._save_checkpoint()
                self._stop(f"no holder was reachable for {timeout:.0f}s ({', '.join(waiting)} have work left)")
                return
            for h in waiting:
                self.schedule.give_up(h)
            self._next_hop(inc)
            return
        self.world.on_node(self.name, min(0.05, self.cfg.backoff_min), self._wait_for_a_holder, inc)

    # -- one hop -------------------------------------------------------------------------------

    def _start_hop(self, a: Assignment) -> None:
        w, cfg = self.world, self.cfg
        expect_bytes = self.manifests[a.holder].chunk_tokens_of(a.chunk, CHUNK_TOKENS) * TOKEN_BYTES
        expect = (segment_count(expect_bytes, SEGMENT_BYTES), expect_bytes)
        capacity = segment_count(CHUNK_TOKENS * TOKEN_BYTES, SEGMENT_BYTES)
        grant = self.token.grant(a.holder, w.clock(self.name), cfg.lease)
        self._reserve_epoch(grant.epoch)
        key, sid = w.fresh_id(), w.fresh_id()
        if self.device.exports_outlive_process:
            self.disk.inflight.add(sid)  # before the export exists: a crash can always clean up
        staging = self.device.alloc_staging(sid, grant.epoch, a.holder, key, capacity)
        via = self.manifests[a.holder].via
        hop = _Hop(a, grant.token_id, grant.epoch, grant.deadline, staging, key, expect, self.device.measure(), via)
        self.hop = hop
        w.note("grant", (grant.epoch, a.holder, a.round, a.chunk))
        # The lease runs on this node's clock: its timer fires when that clock reads the deadline.
        w.on_node(self.name, grant.deadline - w.clock(self.name), self._lease_check, self.incarnation, grant.epoch)
        if via is not None:
            hop.waiting_agent = True
            if not w.send(self.name, via, "agent-stage", (grant.token_id, grant.epoch, a.holder, sid), grant.epoch, mandatory=True):
                self._end_hop(hop, Outcome.UNDELIVERED, f"device agent {via} not connected")
            return
        self._send_grant(hop)

    def _reserve_epoch(self, epoch: int) -> None:
        if epoch > self.reserved_upto:
            self.reserved_upto = epoch + EPOCH_BLOCK - 1
            self.disk.reserved_epoch = self.reserved_upto

    def _send_grant(self, hop: _Hop) -> None:
        body = GrantBody(hop.token_id, hop.a.holder, hop.a.chunk, hop.deadline, hop.key, hop.staging.sid)
        if not self.world.send(self.name, hop.a.holder, "grant", body, hop.epoch, mandatory=True):
            self._end_hop(hop, Outcome.UNDELIVERED, "grant not delivered")
            return
        self._publish("token-state", (hop.epoch, hop.a.holder, self.token.phase.value))

    def _lease_check(self, inc: int, epoch: int) -> None:
        hop = self.hop
        if not self._live(inc) or hop is None or hop.epoch != epoch:
            return
        if hop.waiting_agent:
            # The agent's stage request timed out (the real request's timeout is the lease).
            self._end_hop(hop, Outcome.UNDELIVERED, "device agent did not answer the stage")
            return
        if self.token.expired(self.world.clock(self.name)):
            self._revoke_holder(hop, Outcome.REVOKED)
        elif self.token.phase in (Phase.GRANTED, Phase.HELD):
            # This clock was set back since the grant: look again when it reads the deadline.
            self.world.on_node(self.name, hop.deadline - self.world.clock(self.name) + 1e-6, self._lease_check, inc, epoch)

    def _revoke_holder(self, hop: _Hop, outcome: Outcome) -> None:
        if self.token.phase in (Phase.GRANTED, Phase.HELD):
            self.token.revoke()
        self.world.send(self.name, hop.a.holder, "revoke", hop.token_id, hop.epoch)
        self._end_hop(hop, outcome, "")

    def _returned(self, hop: _Hop, ret: TokenReturn) -> None:
        device = self.device
        if ret.chunk_index != hop.a.chunk or (ret.segments, ret.nbytes) != hop.expect:
            self.token.revoke()
            self._end_hop(hop, Outcome.REJECTED, "return does not match the granted chunk")
            return
        opened = device.open_segments(hop.staging, hop.key, hop.epoch, hop.a.holder, ret.segments)
        device.scrub(hop.staging)
        device.revoke_export(hop.staging)
        if isinstance(opened, str):
            self.token.revoke()
            self._end_hop(hop, Outcome.REJECTED, f"segments refused: {opened}")
            return
        if device.measure() != hop.model_before:
            self.token.revoke()
            self._restore_model()
            self._end_hop(hop, Outcome.ROLLED_BACK, "model changed during the hop; restored the last checkpoint")
            return
        device.train(opened, (hop.a.round, hop.a.holder, hop.a.chunk))
        self._end_hop(hop, Outcome.TRAINED, "")

    def _restore_model(self) -> None:
        ck = self.disk.checkpoint
        self.device.restore(ck["model"] if ck is not None else INITIAL_MODEL)

    def _end_hop(self, hop: _Hop, outcome: Outcome, detail: str) -> None:
        """The epilogue and the run loop's settling of the hop."""
        w, device = self.world, self.device
        if self.remeasure_every_hop and outcome not in (Outcome.TRAINED, Outcome.ROLLED_BACK) and device.measure() != hop.model_before:
            self._restore_model()
            detail += " (model changed during the hop: restored the last checkpoint)"
        if hop.via is not None and outcome in (Outcome.REVOKED, Outcome.DECLINED, Outcome.UNDELIVERED):
            w.send(self.name, hop.via, "revoke", hop.token_id, hop.epoch)
        device.scrub(hop.staging)
        device.release(hop.staging)
        device.drop_key(hop.key)
        self.disk.inflight.discard(hop.staging.sid)
        if self.token.phase in (Phase.GRANTED, Phase.HELD):
            self.token.revoke()
        if self.token.phase is not Phase.IDLE:
            self.token.finish()
        self.hop = None
        assert self.schedule is not None
        if outcome is not Outcome.UNDELIVERED:
            self.away.pop(hop.a.holder, None)
        if outcome is Outcome.TRAINED:
            self.schedule.complete(hop.a)
        elif outcome is Outcome.UNDELIVERED:
            self.schedule.defer(hop.a)
            self._back_off(hop.a.holder)
        else:
            self.schedule.fail(hop.a)
        self.hops.append((hop.epoch, outcome.value))
        w.note("hop", (hop.epoch, hop.a.holder, hop.a.chunk, outcome.value, detail))
        self._save_checkpoint()
        self._publish("hop", (hop.epoch, hop.a.holder, outcome.value))
        w.on_node(self.name, 0.002, self._next_hop, self.incarnation)

    def _save_checkpoint(self) -> None:
        model = self.device.measure()
        self.checker.checkpointed(model)
        self.disk.checkpoint = {
            "epoch": self.token.epoch,
            "schedule": self.schedule.to_state() if self.schedule else None,
            "model": model,
        }

    def _publish(self, kind: str, body: Any) -> None:
        self.world.send(self.name, OBSERVER, kind, body)



class TrainingOnlyRemeasure(SimOrchestrator):
    """The shipped rule: the model is re-measured only before training (found wanting: seed 6)."""

    remeasure_every_hop = False
