"""Seeded faults: drawn up front from the seed, applied at their step, all cleared when the window ends.

Kinds (a fleet adds ``gpu-fails``: one lane's GPU fails, the lane is retired
for the life of that orchestrator process): crash and restart of any node (the orchestrator restarts as
``--resume`` does, from its disk; it may also die between two actions of a
hop, e.g. after reserving an epoch or after training, before the checkpoint), pause (a node stops running and receiving,
then goes on: a SIGSTOP past the lease), partition and heal of one link,
clock skew of one node, message faults for the whole window (drop,
duplicate, delay, which reorders), and tampering with the model while a
holder holds the token. When the window ends every fault is undone: links
heal, clocks agree, paused nodes run, crashed nodes restart. From then on
the run must end (the ``no-progress`` invariant).
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Final, Mapping, Protocol

from gtbus.protocol.token import Phase
from gtbus.testing.sim.config import ORCHESTRATOR, SimConfig
from gtbus.testing.sim.world import World

KINDS: Final = ("crash", "pause", "partition", "skew", "tamper", "crash-mid-hop", "outage", "code-change")


class Restartable(Protocol):
    """A node that can crash and start again."""

    name: str
    up: bool

    def start(self) -> None:
        """Start again."""

    def crash(self) -> None:
        """Die now."""


def plan_faults(world: World, cfg: SimConfig, nodes: Mapping[str, Any], keep: Collection[int] | None = None) -> list[str]:
    """Draw this seed's faults and schedule them within ``cfg.fault_window``; their names, by index.

    Index 0 is the window's message faults, 1.. the discrete ones. With ``keep``,
    only those indices are applied; every fault is still drawn, so the seed's
    random stream, and so the rest of the run, stays the same (this is what
    shrinking a failing seed relies on).
    """
    if not cfg.faults:
        return []
    rng, window, lease = world.rng, cfg.fault_window, cfg.lease
    drop, dup, delay = rng.choice((0.0, 0.0, 0.02, 0.1)), rng.choice((0.0, 0.0, 0.05, 0.2)), rng.choice((0.0, 0.1, 0.3))
    names = sorted(nodes)
    plan: list[tuple[str, list[tuple[float, Callable[..., None], tuple[Any, ...]]]]] = []
    # A fleet's GPUs can fail too (drawn only then: one GPU's seeds keep their faults).
    kinds = KINDS if cfg.gpus == 1 else (*KINDS, "gpu-fails")
    for _ in range(rng.randint(0, 10)):
        t = rng.uniform(0.0, window)
        kind = rng.choice(kinds)
        who = rng.choice(names)
        if kind == "crash":
            events = [(t, _crash, (world, nodes[who], rng.uniform(0.02, 2.0) if rng.random() < 0.7 else rng.uniform(2.0, 8.0)))]
        elif kind == "pause":
            events = [(t, _pause, (world, who, rng.uniform(0.05, 2.5 * lease)))]
        elif kind == "partition":
            other = rng.choice([n for n in names if n != who])
            events = [(t, _cut, (world, who, other, rng.uniform(0.05, 3 * lease) if rng.random() < 0.7 else rng.uniform(3.0, 8.0)))]
        elif kind == "skew":
            events = [(t, _skew, (world, who, rng.uniform(-2 * lease, 2 * lease), rng.uniform(0.1, 3.0)))]
        elif kind == "outage":
            # Every holder cut off for longer than the absent timeout: chunks skipped, or the run stops.
            dt = cfg.absent_timeout + rng.uniform(0.5, 4.0)
            events = [(t, _cut, (world, ORCHESTRATOR, h, dt)) for h in cfg.holders]
            who = "holders"
        elif kind == "tamper":
            events = [(t, _tamper, (world, nodes[ORCHESTRATOR], rng.getrandbits(64)))]
            who = ORCHESTRATOR
        elif kind == "gpu-fails":
            lane = rng.randrange(cfg.gpus)
            events = [(t, _fail_gpu, (world, nodes[ORCHESTRATOR], lane))]
            who = f"gpu{lane}"
        elif kind == "code-change":
            events = [(t, _change_code, (world, nodes[ORCHESTRATOR]))]
            who = ORCHESTRATOR
        else:
            events = [(t, _crash_mid_hop, (world, nodes[ORCHESTRATOR], rng.randint(1, 8), rng.uniform(0.02, 2.0)))]
            who = ORCHESTRATOR
        plan.append((f"{kind} {who} at {t:.3f}", events))
    if keep is None or 0 in keep:
        world.p_drop, world.p_dup, world.p_delay, world.max_delay = drop, dup, delay, 2 * lease
    for index, (_, events) in enumerate(plan, start=1):
        if keep is None or index in keep:
            for t, fn, args in events:
                world.at(t, fn, *args)
    world.at(window, end_faults, world, nodes)
    return [f"messages: drop {drop}, duplicate {dup}, delay {delay}", *(name for name, _ in plan)]


def _crash(world: World, node: Restartable, down_for: float) -> None:
    if node.up:
        world.note("fault: crash", node.name)
        node.crash()
        world.after(down_for, _restart, world, node)


def _restart(world: World, node: Restartable) -> None:
    if not node.up:
        world.note("fault: restart", node.name)
        node.start()


def _crash_mid_hop(world: World, orch: Any, actions: int, down_for: float) -> None:
    # The orchestrator dies just before the ``actions``-th hop action it executes from now.
    orch.crash_countdown = actions
    orch.crash_hook = lambda: _crash(world, orch, down_for)


def _pause(world: World, who: str, dt: float) -> None:
    world.note("fault: pause", (who, round(dt, 3)))
    world.paused_until[who] = max(world.paused_until.get(who, 0.0), world.now + dt)


def _cut(world: World, a: str, b: str, dt: float) -> None:
    link = frozenset((a, b))
    world.note("fault: partition", (a, b, round(dt, 3)))
    world.cut.setdefault(link, world.now)
    world.after(dt, _heal, world, link)


def _heal(world: World, link: frozenset[str]) -> None:
    world.cut.pop(link, None)


def _skew(world: World, who: str, offset: float, dt: float) -> None:
    world.note("fault: skew", (who, round(offset, 3)))
    world.skew[who] = offset
    world.after(dt, world.skew.pop, who, None)


def _held(orch: Any) -> list[Any]:
    # The lanes whose token a holder holds (its grant sent): otherwise the orchestrator owns the device.
    if not orch.up:
        return []
    return [lane for lane in orch.lanes if lane.hop is not None and lane.token.phase in (Phase.GRANTED, Phase.HELD)]


def _tamper(world: World, orch: Any, digest: int) -> None:
    # The first such lane's replica (a fleet's: one GPU's model), while its holder provisions.
    for lane in _held(orch):
        if not lane.hop.waiting_agent and lane.device.model is not None:
            world.note("fault: model tampered", lane.hop.machine.epoch)
            lane.device.model = digest
            return


def _fail_gpu(world: World, orch: Any, lane: int) -> None:
    # For the life of this orchestrator process; a restarted one opens every GPU afresh.
    if orch.up:
        world.note("fault: gpu failed", lane)
        orch.fail_lane(lane)


def _change_code(world: World, orch: Any) -> None:
    # Loaded code changed while a holder holds a token: the hop rolls back and the run stops.
    held = _held(orch)
    if held:
        world.note("fault: loaded code changed", held[0].hop.machine.epoch)
        orch.code_changed = "gtbus.training.trainer.Trainer.train_on"


def end_faults(world: World, nodes: Mapping[str, Any]) -> None:
    """Undo every fault: message faults off, links healed, clocks agree, nodes running."""
    world.note("faults end")
    world.p_drop = world.p_dup = world.p_delay = 0.0
    world.cut.clear()
    world.skew.clear()
    world.paused_until.clear()
    orch = nodes[ORCHESTRATOR]
    orch.crash_countdown, orch.crash_hook = 0, None
    for name in sorted(nodes):
        _restart(world, nodes[name])
