"""The shape of one simulated deployment, drawn from its seed.

Small on purpose: a few holders with a few chunks each, one or two rounds,
short leases in simulated seconds. Many small runs under many fault schedules
find more than a few big ones, and each stays fast.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from gtbus.protocol.admission import TOKEN_BYTES

#: Tokens per chunk, and AEAD segment bytes: a full chunk is three segments.
CHUNK_TOKENS = 64
SEGMENT_BYTES = 48
AGENT = "agent1"
ORCHESTRATOR = "orch"
OBSERVER = "status"


@dataclass
class SimConfig:
    """One deployment: who holds how much, run settings, and the fault window."""

    holders: list[str]
    remote: list[str]  # holders that write through the device agent (travel mode)
    tokens: dict[str, int]  # each holder's dataset size, in tokens
    rounds: int = 1
    mode: str = "travel"  # or "ship": segments cross the network to the orchestrator
    lease: float = 1.0
    max_attempts: int = 2
    backoff_min: float = 0.25
    backoff_max: float = 8.0
    absent_timeout: float = 5.0
    register_timeout: float = 12.0
    exports_outlive_process: bool = True
    faults: bool = True
    fault_window: float = 0.0  # simulated seconds from the start during which faults happen
    hostile: dict[str, str] = field(default_factory=dict)  # holder -> behaviour (see hostile.py)
    operator_resumes: bool = False  # a run that stopped with a reason is started again with --resume (once)
    gpus: int = 1  # lanes: GPU tokens travelling at once
    merge_every: int = 2  # with gpus > 1: replicas are averaged after this many trained hops of the fleet
    # With gpus > 1, --merge lockstep: hops start in waves (FleetSchedule.waves), merged after every wave that trained.
    lockstep: bool = False
    # One lane, travel mode: the next hop's staging and key go to the holder it likely is while the hop before runs.
    prepare: bool = True

    @property
    def nodes(self) -> list[str]:
        """Every node that can crash, pause or be cut off."""
        return [ORCHESTRATOR, *self.holders, *([AGENT] if self.via_agent else []), OBSERVER]

    @property
    def via_agent(self) -> list[str]:
        """Holders that write through the device agent (only travel mode has one)."""
        return self.remote if self.mode == "travel" else []

    @property
    def total_hops(self) -> int:
        """Hops a fault-free run takes."""
        return self.rounds * sum(-(-n // CHUNK_TOKENS) for n in self.tokens.values())

    def liveness_bound(self) -> float:
        """Simulated seconds after faults stop within which the run must have ended.

        Every hop may take a lease and a retry; a holder may need a backoff and
        the absent timeout; registration may need its timeout again.
        """
        per_hop = self.lease + 0.2
        return self.total_hops * self.max_attempts * per_hop + self.backoff_max + 2 * self.absent_timeout + self.register_timeout + 5.0


def draw_config(rng: random.Random, *, faults: bool = True, hostile: bool = True, gpus: int = 1) -> SimConfig:
    """A deployment drawn from ``rng``: 2-4 holders (maybe one remote), 1-3 chunks each, 1-2 rounds, travel or ship;
    with ``gpus`` > 1 a fleet, merging every 1-4 trained hops (drawn last: one GPU's seeds are the same as before fleets)."""
    from gtbus.testing.sim.hostile import BEHAVIOURS

    n = rng.randint(2, 4)
    holders = [f"h{i}" for i in range(1, n + 1)]
    remote = [holders[-1]] if rng.random() < 0.4 else []
    tokens = {h: rng.randint(1, 3 * CHUNK_TOKENS) for h in holders}
    cfg = SimConfig(
        holders=holders,
        remote=remote,
        tokens=tokens,
        rounds=rng.randint(1, 2),
        mode="ship" if rng.random() < 0.25 else "travel",
        exports_outlive_process=rng.random() < 0.5,
        faults=faults,
        fault_window=rng.uniform(0.2, 3.0 if rng.random() < 0.7 else 10.0) if faults else 0.0,
        operator_resumes=rng.random() < 0.5,
    )
    if hostile and rng.random() < 0.5:
        cfg.hostile[rng.choice(holders)] = rng.choice(sorted(BEHAVIOURS))
    cfg.gpus = gpus
    if gpus > 1:
        cfg.merge_every = rng.randint(1, 4)
        if n > 2 and rng.random() < 0.3:
            cfg.remote = holders[-2:]  # two remote holders behind the one device agent, on two lanes at once if allowed
    return cfg
