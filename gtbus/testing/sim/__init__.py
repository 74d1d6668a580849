"""A whole deployment in one process, deterministic from a seed, under injected faults.

FoundationDB's simulation and TigerBeetle's VOPR are the model: the
orchestrator, N holders, a device agent with a remote holder and an observer
run as simulated nodes over a simulated network with one seeded clock and
event queue (:mod:`world`). The decisions are the real sans-I/O machines'
(hop, token, schedule, enrolment and admission, holder liveness, the holder's
hop, the agent's staging, the message registry's body and role checks); the
nodes are shells that do what they decide, in events instead of awaits.
No asyncio and no crypto: the device (:mod:`device`) models the AEAD by what
it binds (key, epoch, holder, index, count), and the model by a digest chain.

Faults (:mod:`faults`): crash and restart of any node, orchestrator resume
from its disk, pause past the lease, partition and heal, drop, duplicate,
delay and reorder, clock skew, model tampering; hostile holders
(:mod:`hostile`). Invariants (:mod:`invariants`) are checked after every step.
A failing seed prints the line that reproduces it; :func:`shrink` keeps only
the faults it still fails with, and its last events are printed.

Run it with ``gtbus sim --seeds N`` or :func:`run_seeds`.
"""

from gtbus.testing.sim.invariants import INVARIANTS, InvariantChecker, Violation
from gtbus.testing.sim.run import Machines, SeedResult, SeedsSummary, run_seed, run_seeds, shrink

__all__ = ["INVARIANTS", "InvariantChecker", "Machines", "SeedResult", "SeedsSummary", "Violation", "run_seed", "run_seeds", "shrink"]
