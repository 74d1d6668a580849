"""Time as an injected dependency.

Protocol state machines never read the system clock themselves; they are given
a :class:`Clock`, so tests can drive expiry, leases and skew with
:class:`gtbus.testing.FakeClock` instead of sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A source of wall-clock time (seconds since the epoch) and monotonic time."""

    def time(self) -> float:
        """Wall-clock seconds since the Unix epoch (used on the wire)."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds (used for local deadlines)."""
        ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        """Wall-clock seconds since the Unix epoch."""
        return time.time()

    def monotonic(self) -> float:
        """Monotonic seconds."""
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()
