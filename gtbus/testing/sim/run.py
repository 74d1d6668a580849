"""Run one seed, or many: build the deployment, plan its faults, step it, check it.

A run ends when the orchestrator finishes or stops with a reason, when an
invariant fails, or when the liveness bound after the fault window passes
(then ``no-progress`` fails). Its :class:`SeedResult` carries the line that
reproduces it and the last events before the end.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection

from gtbus.protocol.fleet import FleetSchedule
from gtbus.protocol.hop import HopMachine
from gtbus.protocol.schedule import Schedule
from gtbus.protocol.token import TokenMachine
from gtbus.testing.sim.agent import SimAgent, SimObserver
from gtbus.messages.identity import Role
from gtbus.testing.sim.config import AGENT, OBSERVER, ORCHESTRATOR, SimConfig, draw_config
from gtbus.testing.sim.device import SimDevice, SimHost
from gtbus.testing.sim.faults import plan_faults
from gtbus.testing.sim.holder import SimHolder
from gtbus.testing.sim.hostile import hostile_holder
from gtbus.testing.sim.invariants import InvariantChecker, Violation
from gtbus.testing.sim.orchestrator import OrchestratorDisk, SimOrchestrator
from gtbus.testing.sim.world import World

MAX_STEPS = 200_000
_ROLES = {ORCHESTRATOR: Role.ORCHESTRATOR, AGENT: Role.AGENT, OBSERVER: Role.OBSERVER}  # far above any run's need; a guard against a run that never ends


@dataclass
class Machines:
    """Which classes play each part: the real ones, or a test's deliberately broken double."""

    orchestrator: type[SimOrchestrator] = SimOrchestrator
    device: type[SimDevice] = SimDevice
    holder: type[SimHolder] = SimHolder
    token: Callable[..., TokenMachine] = TokenMachine
    schedule: Callable[..., Schedule] = Schedule
    hop: Callable[..., HopMachine] = HopMachine
    fleet: Callable[..., FleetSchedule] = FleetSchedule


@dataclass
class SeedResult:
    """What one seed did."""

    seed: int
    config: SimConfig
    hops: int
    trained: int
    finished: bool
    stopped: str | None
    sim_time: float
    steps: int
    faults: list[str]  # every fault drawn, by index (see plan_faults)
    violations: list[Violation]
    trace: list[str] = field(default_factory=list)
    flags: str = ""
    outcomes: dict[str, int] = field(default_factory=dict)
    restarts: int = 0  # orchestrator restarts (resumed from its disk)
    kept: list[int] | None = None  # the faults applied, by index, when not all of them
    config_given: bool = False  # run with an explicit SimConfig rather than the seed's own
    lane_hops: list[int] = field(default_factory=list)  # settled hops per lane (GPU)
    requeued: int = 0  # trainings thrown away with a replica (rolled back, or its GPU failed) and trained again
    prepared: dict[str, int] = field(default_factory=dict)  # hops prepared ahead: made, used, discarded

    @property
    def ok(self) -> bool:
        """No invariant failed."""
        return not self.violations

    @property
    def repro(self) -> str:
        """The one line that runs this seed again."""
        return f"gtbus sim --seed {self.seed}{self.flags}"


def run_seed(seed: int, *, faults: bool = True, hostile: bool = True, machines: Machines | None = None,
             config: SimConfig | None = None, keep_faults: Collection[int] | None = None, gpus: int = 1, lockstep: bool = False) -> SeedResult:
    """Simulate the deployment of ``seed`` under its faults (only ``keep_faults``, by index, if given), on
    ``gpus`` lanes, in lockstep waves if asked (a given ``config`` says its own); every invariant checked after every step."""
    m = machines or Machines()
    world = World(seed)
    cfg = config or draw_config(world.rng, faults=faults, hostile=hostile, gpus=gpus)
    if config is None:
        cfg.lockstep = lockstep and gpus > 1  # not drawn: the seeds' fleets stay the ones they were
    checker = InvariantChecker()
    devices = [m.device(exports_outlive_process=cfg.exports_outlive_process) for _ in range(cfg.gpus)]
    for lane, d in enumerate(devices):
        d.watch = checker
        d.lane = lane
    checker.devices = devices
    device = devices[0]
    # Holders and the agent reach staging by its handle on whichever GPU exported it.
    host: Any = device if cfg.gpus == 1 else SimHost(devices)
    orch = m.orchestrator(world, cfg, device, checker, OrchestratorDisk(), token_factory=m.token, schedule_factory=m.schedule,
                          hop_factory=m.hop, fleet_factory=m.fleet, devices=devices)
    nodes: dict[str, Any] = {orch.name: orch}
    for h in cfg.holders:
        cls = hostile_holder(cfg.hostile[h]) if h in cfg.hostile else m.holder
        nodes[h] = cls(world, cfg, host, h)
    if cfg.via_agent:
        agent = SimAgent(world, host)
        nodes[agent.name] = agent
    observer = SimObserver(world)
    nodes[observer.name] = observer
    for n in nodes.values():
        world.add(n, _ROLES.get(n.name, Role.HOLDER))
    for name in sorted(nodes):
        world.at(world.rng.uniform(0.0, 0.01), nodes[name].start)
    planned = plan_faults(world, cfg, nodes, keep_faults)
    deadline = cfg.fault_window + cfg.liveness_bound()
    step, check = world.step, checker.check_step
    resumed = False
    while True:
        while not orch.finished and orch.stopped is None and step():
            checker.now = world.now
            check(device)
            if checker.violations or world.now > deadline or world.steps >= MAX_STEPS:
                break
        if orch.stopped is None or checker.violations or resumed or not cfg.operator_resumes:
            break
        # The operator starts the run again with --resume once faults are over, and the holders.
        resumed = True
        world.note("operator: --resume", orch.stopped)
        world.at(max(world.now, cfg.fault_window) + 1.0, _operator_resume, nodes)
        deadline = max(world.now, cfg.fault_window) + 1.0 + cfg.liveness_bound()
        orch.stopped = None
        orch.exit()  # the stopped process is gone; nothing of it runs until the restart
    checker.now = world.now
    if not checker.violations:
        checker.check_end(orch.finished, orch.stopped, world.now - cfg.fault_window)
    if not checker.violations and orch.finished and orch.schedule is not None:
        # A fleet's final model: its live replicas, merged; what a replica threw away was trained again.
        checker.check_final_model(orch.final_model(), expected_trainings(orch.schedule))
    flags = ("" if faults else " --no-faults") + ("" if hostile else " --no-hostile") + (f" --gpus {cfg.gpus}" if cfg.gpus > 1 else "") + (" --lockstep" if cfg.lockstep else "")
    if keep_faults is not None:
        flags += f" --faults {','.join(map(str, sorted(keep_faults))) or 'none'}"
    result = SeedResult(seed, cfg, len(checker.epochs), checker.trained_hops, orch.finished, orch.stopped,
                        world.now, world.steps, planned, list(checker.violations), flags=flags)
    for _, outcome in orch.hops:
        result.outcomes[outcome] = result.outcomes.get(outcome, 0) + 1
    result.restarts = orch.incarnation - 1
    result.kept = sorted(keep_faults) if keep_faults is not None else None
    result.config_given = config is not None
    result.lane_hops = list(orch.lane_hops)
    result.requeued = len(orch.requeued)
    result.prepared = orch.prepares.as_dict()
    if checker.violations:
        result.trace = [f"t={t:.4f} {what}" + (f" {detail}" if detail is not None else "") for t, what, detail in world.trace]
    return result


def shrink(result: SeedResult, *, machines: Machines | None = None) -> SeedResult:
    """The failing seed again with as few of its faults as still give the same violation.

    Greedy delta debugging: each fault in turn is left out, and stays out if the
    first violation keeps its name. Everything else of the seed stays the same.
    """
    if result.ok or not result.faults:
        return result
    name = result.violations[0].name
    faults, hostile = "--no-faults" not in result.flags, "--no-hostile" not in result.flags
    keep = list(range(len(result.faults)))
    best = result
    for index in list(keep):
        trial = [i for i in keep if i != index]
        r = run_seed(result.seed, faults=faults, hostile=hostile, machines=machines, keep_faults=trial,
                     config=result.config if result.config_given else None, gpus=result.config.gpus, lockstep=result.config.lockstep)
        if not r.ok and r.violations[0].name == name:
            keep, best = trial, r
    return best


def _operator_resume(nodes: dict[str, Any]) -> None:
    for name in sorted(nodes):
        node = nodes[name]
        if node.name == ORCHESTRATOR:
            node.up = True
            node.resume_after_stop()
        else:
            if node.up:
                node.crash()
            node.start()


def expected_trainings(schedule: Schedule) -> set[tuple[int, str, int]]:
    """Every (round, holder, chunk) a finished schedule trained: all of them but the skipped."""
    skipped = {tuple(x) for x in schedule.skipped}
    return {(r, h, c) for r in range(schedule.rounds) for h, n in schedule.chunks.items() for c in range(n)} - skipped


@dataclass
class SeedsSummary:
    """Many seeds: totals, speed, and the failing ones."""

    seeds: int
    hops: int
    trained: int
    violations: int
    seconds: float
    failures: list[SeedResult]
    finished: int
    stopped: dict[str, int]
    outcomes: dict[str, int] = field(default_factory=dict)
    restarts: int = 0
    modes: set[str] = field(default_factory=set)
    prepared: dict[str, int] = field(default_factory=dict)  # hops prepared ahead: made, used, discarded (totals)

    @property
    def hops_per_s(self) -> float:
        """Simulated hops (grants) per second of wall time."""
        return self.hops / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """What ``gtbus sim --json`` prints."""
        return {
            "seeds": self.seeds,
            "hops": self.hops,
            "hops_trained": self.trained,
            "violations": self.violations,
            "hops_per_s": round(self.hops_per_s, 1),
            "seconds": round(self.seconds, 3),
            "finished": self.finished,
            "stopped": self.stopped,
            "outcomes": dict(sorted(self.outcomes.items())),
            "orchestrator_restarts": self.restarts,
            "prepared_hops": self.prepared,
            "failing": [{"seed": r.seed, "repro": r.repro, "violations": [str(v) for v in r.violations]} for r in self.failures],
        }


def run_seeds(count: int, *, first: int = 0, faults: bool = True, hostile: bool = True, machines: Machines | None = None,
              on_result: Callable[[SeedResult], None] | None = None, gpus: int = 1, lockstep: bool = False) -> SeedsSummary:
    """Run seeds ``first`` .. ``first + count - 1`` on ``gpus`` lanes (in lockstep waves if asked)."""
    t0 = time.perf_counter()
    hops = trained = finished = 0
    failures: list[SeedResult] = []
    stopped: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    restarts = 0
    modes: set[str] = set()
    prepared = {"made": 0, "used": 0, "discarded": 0}
    for seed in range(first, first + count):
        r = run_seed(seed, faults=faults, hostile=hostile, machines=machines, gpus=gpus, lockstep=lockstep)
        hops += r.hops
        trained += r.trained
        finished += r.finished
        if r.stopped:
            why = re.sub(r"\d+(\.\d+)?", "N", re.sub(r" \(.*?\)", "", r.stopped.split(";")[0]))
            stopped[why] = stopped.get(why, 0) + 1
        restarts += r.restarts
        modes.add(r.config.mode)
        for k in prepared:
            prepared[k] += r.prepared.get(k, 0)
        for k, v in r.outcomes.items():
            outcomes[k] = outcomes.get(k, 0) + v
        if not r.ok:
            failures.append(r)
        if on_result is not None:
            on_result(r)
    return SeedsSummary(count, hops, trained, sum(len(r.violations) for r in failures), time.perf_counter() - t0, failures, finished, stopped,
                        outcomes, restarts, modes, prepared)
