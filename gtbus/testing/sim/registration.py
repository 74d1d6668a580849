"""Registering with the orchestrator, as holders and the device agent do in the simulation.

A node registers until it is welcomed, every second, and again whenever it
hears of an orchestrator process it was not welcomed by (a restart).
"""

from __future__ import annotations

from typing import Any

from gtbus.testing.sim.config import ORCHESTRATOR
from gtbus.testing.sim.world import Envelope, World

REGISTER_RETRY = 1.0


class Registrant:
    """The registration half of a simulated node."""

    world: World
    name: str
    up: bool
    incarnation: int
    welcomed: int | None

    def registration(self) -> Any:
        """The body of its ``register`` message."""
        return None

    def _register(self, inc: int) -> None:
        if self.up and inc == self.incarnation and self.welcomed is None:
            self.world.send(self.name, ORCHESTRATOR, "register", self.registration())
            self.world.on_node(self.name, REGISTER_RETRY, self._register, inc)

    def on_registration(self, env: Envelope) -> bool:
        """Handle ``hello`` and ``welcome``; False for any other message."""
        if env.kind == "hello":
            if self.welcomed != env.body:
                self.welcomed = None
                self._register(self.incarnation)
            return True
        if env.kind == "welcome":
            self.welcomed = env.body
            return True
        return False
