"""The simulated world: one seeded clock and event queue, and the network between nodes.

Rules:

* There is one source of time (:attr:`World.now`) and one source of randomness
  (:attr:`World.rng`, seeded): a seed replays the same run, event for event.
* Events are ``(time, seq, callback)``; ``seq`` breaks ties in the order they
  were scheduled, so nothing depends on hashing or dict order.
* A node's clock is the world's plus its skew (a fault may set one).
* The network delivers :class:`Envelope` objects after a latency, in order on
  each link (one TCP connection each). Faults may drop, duplicate or delay one
  (a delayed message is overtaken: that is how messages reorder), and cut
  links (partition).
  A receiver refuses a message id it has seen (the replay guard; its marks
  survive restarts, as the real journal does).
* A message whose sender's role may not send its type (the registry's
  ``senders``) is refused on receipt, as the receive pipeline does.
* Sending to a node that is down, or across a link cut for longer than the
  ZMTP heartbeat timeout (the connection is dropped then), is *undelivered*
  for the orchestrator's ROUTER (``ROUTER_MANDATORY``: the real send raises); a DEALER's message to
  a down orchestrator waits in its queue and arrives when it is back, as
  ZeroMQ would deliver it.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Final, Protocol

from gtbus.messages.identity import Role
from gtbus.messages.registry import REGISTRY

#: Seconds after which a silent link's connection is dropped (ZMTP heartbeats).
ZMTP_TIMEOUT = 1.0
#: How many recent events a failing seed prints.
TRACE_LEN = 40

#: The simulation's message kinds and the wire types they stand for ("hello" has none:
#: it stands for a holder noticing a new orchestrator process).
WIRE_TYPE: Final = {
    "heartbeat": "heartbeat", "register": "register", "welcome": "welcome", "refusal": "refusal",
    "snapshot-request": "snapshot.request", "snapshot": "snapshot", "grant": "token.grant", "ack": "token.ack",
    "return": "token.return", "decline": "token.decline", "ship-segment": "ship.segment", "revoke": "token.revoke",
    "token-state": "token.state", "hop": "hop.record", "complete": "run.complete", "shutdown": "shutdown",
    "agent-stage": "agent.stage", "agent-ready": "agent.ready", "agent-done": "agent.done", "agent-written": "agent.written",
}  # fmt: skip
_SENDERS: Final = {kind: REGISTRY[name].senders for kind, name in WIRE_TYPE.items()}


@dataclass(slots=True)
class Envelope:
    """One message in flight: who to whom, its kind, the token epoch in its header, its body."""

    src: str
    dst: str
    kind: str
    epoch: int
    body: Any
    mid: int


class SimNode(Protocol):
    """What the world needs of a node."""

    name: str
    up: bool

    def receive(self, env: Envelope) -> None:
        """Handle one delivered message."""


class World:
    """Clock, event queue, network and trace of one simulated deployment."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self._mid = 0
        self.nodes: dict[str, SimNode] = {}
        self.roles: dict[str, Role] = {}
        self.skew: dict[str, float] = {}
        self.paused_until: dict[str, float] = {}
        self.cut: dict[frozenset[str], float] = {}  # link -> when it was cut
        self.seen: dict[str, set[int]] = {}
        self.held: dict[str, list[Envelope]] = {}  # DEALER queues towards a node that is down
        self._link_clock: dict[tuple[str, str], float] = {}  # last in-order arrival per link
        self.trace: deque[tuple[float, str, Any]] = deque(maxlen=TRACE_LEN)
        self.steps = 0
        # Message faults, as probabilities per message (the fault plan sets them).
        self.p_drop = 0.0
        self.p_dup = 0.0
        self.p_delay = 0.0
        self.max_delay = 0.0

    # -- time ---------------------------------------------------------------------------------

    def clock(self, node: str) -> float:
        """``node``'s wall clock: the world's time plus its skew."""
        return self.now + self.skew.get(node, 0.0)

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` at world time ``t`` (never in the past)."""
        heapq.heappush(self._queue, (max(t, self.now), self._seq, fn, args))
        self._seq += 1

    def after(self, dt: float, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` ``dt`` seconds from now."""
        self.at(self.now + dt, fn, *args)

    def on_node(self, node: str, dt: float, fn: Callable[..., None], *args: Any) -> None:
        """Run ``node``'s own work ``fn(*args)`` in ``dt`` seconds, later if the node is paused then."""
        self.after(dt, self._run_on, node, fn, args)

    def _run_on(self, node: str, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        until = self.paused_until.get(node, 0.0)
        if until > self.now:
            self.at(until, self._run_on, node, fn, args)
            return
        fn(*args)

    def step(self) -> bool:
        """Run the next event; False when there is none."""
        if not self._queue:
            return False
        t, _, fn, args = heapq.heappop(self._queue)
        self.now = t
        self.steps += 1
        fn(*args)
        return True

    @property
    def idle(self) -> bool:
        """No event is left."""
        return not self._queue

    def note(self, what: str, detail: Any = None) -> None:
        """Add an entry to the trace (formatted only if the seed fails)."""
        self.trace.append((self.now, what, detail))

    # -- network ------------------------------------------------------------------------------

    def add(self, node: SimNode, role: Role) -> None:
        """Put a node with its role on the network."""
        self.nodes[node.name] = node
        self.roles[node.name] = role
        self.seen.setdefault(node.name, set())

    def linked(self, a: str, b: str) -> bool:
        """Whether the link between ``a`` and ``b`` is up (no partition between them)."""
        return not self.cut or frozenset((a, b)) not in self.cut

    def send(self, src: str, dst: str, kind: str, body: Any, epoch: int = 0, *, mandatory: bool = False) -> bool:
        """Send a message; False if ``mandatory`` and ``dst`` is down (the ROUTER's undelivered)."""
        node = self.nodes[dst]
        if mandatory:
            if not node.up:
                return False
            since = self.cut.get(frozenset((src, dst))) if self.cut else None
            if since is not None and self.now - since >= ZMTP_TIMEOUT:
                return False
        self._mid += 1
        env = Envelope(src, dst, kind, epoch, body, self._mid)
        rng = self.rng
        if self.p_drop and rng.random() < self.p_drop:
            self.note("drop", (kind, src, dst, epoch))
            return True
        arrival = self.now + 0.001 + rng.random() * 0.004
        if self.p_delay and rng.random() < self.p_delay:
            arrival += rng.random() * self.max_delay  # held up: later messages overtake it
        else:
            link = (src, dst)
            arrival = max(arrival, self._link_clock.get(link, 0.0) + 1e-6)
            self._link_clock[link] = arrival
        delay = arrival - self.now
        self.at(arrival, self._deliver, env)
        if self.p_dup and rng.random() < self.p_dup:
            self.after(delay + rng.random() * 0.01, self._deliver, env)
        return True

    def _deliver(self, env: Envelope) -> None:
        node = self.nodes[env.dst]
        if not self.linked(env.src, env.dst):
            self.note("lost (partition)", (env.kind, env.src, env.dst, env.epoch))
            return
        if not node.up:
            if env.dst in self.held:
                self.held[env.dst].append(env)
            return
        until = self.paused_until.get(env.dst, 0.0)
        if until > self.now:
            self.at(until, self._deliver, env)
            return
        allowed = _SENDERS.get(env.kind)
        if allowed is not None and self.roles[env.src] not in allowed:
            self.note("wrong role refused", (env.kind, env.src, env.dst, env.epoch))
            return
        seen = self.seen[env.dst]
        if env.mid in seen:
            self.note("replay refused", (env.kind, env.src, env.dst, env.epoch))
            return
        seen.add(env.mid)
        self.note("deliver", (env.kind, env.src, env.dst, env.epoch))
        node.receive(env)

    def hold_while_down(self, name: str) -> None:
        """``name`` went down: messages to it wait (DEALER queues) until :meth:`release_held`."""
        self.held[name] = []

    def release_held(self, name: str) -> None:
        """``name`` is back: what waited for it is delivered now."""
        for env in self.held.pop(name, []):
            self.after(0.001, self._deliver, env)

    def fresh_id(self) -> int:
        """A new unguessable number (token ids, staging handles, keys), deterministic per seed."""
        return self.rng.getrandbits(48)
