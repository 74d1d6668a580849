"""The keys of a whole deployment on one machine: an orchestrator, holders, an observer, device agents.

What ``gtbus demo``, the bench and the tests start from, written exactly as an
operator's ``gtbus keygen`` would: a ``NAME.key`` (0600) and ``NAME.pub`` per
node in one folder. Names are fixed (``orch``, ``h1``..``hN``, ``status``,
``agent1``..) so that runs are easy to read; a key file already there is
replaced (a fresh deployment each time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from gtbus.messages.identity import NodeIdentity, Role, Roster, write_identity


@dataclass
class Deployment:
    """Keys of a throwaway deployment: one orchestrator and some holders."""

    key_dir: Path
    orchestrator: NodeIdentity
    holders: list[NodeIdentity]
    observer: NodeIdentity
    agents: list[NodeIdentity] = field(default_factory=list)

    @property
    def roster(self) -> Roster:
        """Every node's public identity."""
        return Roster([self.orchestrator.public, *(h.public for h in self.holders), self.observer.public, *(a.public for a in self.agents)])

    def key_path(self, name: str) -> Path:
        """Path of a node's secret key file."""
        return self.key_dir / f"{name}.key"


def make_deployment(key_dir: str | os.PathLike[str], holders: int = 3, *, orchestrator: str = "orch", agents: int = 0) -> Deployment:
    """Generate and write keys for an orchestrator, ``holders`` holders (h1, h2, ...), an observer ("status") and ``agents`` device agents."""
    d = Path(key_dir)

    def new(name: str, role: Role) -> NodeIdentity:
        identity = NodeIdentity.generate(name, role)
        write_identity(identity, d, overwrite=True)
        return identity

    orch = new(orchestrator, Role.ORCHESTRATOR)
    hs = [new(f"h{i}", Role.HOLDER) for i in range(1, holders + 1)]
    obs = new("status", Role.OBSERVER)
    ags = [new(f"agent{i}", Role.AGENT) for i in range(1, agents + 1)]
    return Deployment(d, orch, hs, obs, ags)
