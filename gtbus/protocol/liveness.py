"""Which holders the orchestrator may grant now, after grants that did not reach them.

Rules:

* A holder whose grant was undelivered backs off: it is passed over until
  ``backoff_min`` seconds after the failure, doubling with every further
  failure up to ``backoff_max``. A holder heard from since the failure (it
  reconnected) is tried again after ``backoff_min``.
* A holder that is reached again (any grant delivered) starts afresh.
* A holder is *gone* when it has been unreachable and silent for
  ``absent_timeout`` seconds since its first failure (or since it was last
  heard, if later).
* When only unreachable holders have work left and all of them are gone, the
  run either gives up on them for this round (their chunks are skipped and
  reported) or, when no holder of the run at all has been heard from for
  ``absent_timeout``, stops with a named reason (resumable).

No I/O and no clock: ``now`` (monotonic seconds) and the times each holder
was last heard (absent: never) are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Sequence


class WhileAway(str, Enum):
    """What the run does while only unreachable holders have work left."""

    WAIT = "wait"  # someone may come back: look again shortly
    GO_ON = "go-on"  # a holder with work left can be granted now
    GIVE_UP = "give-up"  # every one of them is gone: skip their chunks for this round
    STOP = "stop"  # nobody of the run has been heard from for the absent timeout


@dataclass(frozen=True)
class _Away:
    failed_at: float  # the last undelivered grant
    since: float  # the first undelivered grant since the holder was last reached
    backoff: float


class HolderLiveness:
    """Backoff and absence of the holders a run could not reach."""

    def __init__(self, backoff_min: float, backoff_max: float, absent_timeout: float) -> None:
        if not 0 < backoff_min <= backoff_max or absent_timeout <= 0:
            raise ValueError("backoff_min must be positive and at most backoff_max; absent_timeout positive")
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.absent_timeout = absent_timeout
        self._away: dict[str, _Away] = {}

    def unreached(self, holder: str, now: float) -> None:
        """A grant to ``holder`` was not delivered at ``now``: back off (doubling)."""
        prev = self._away.get(holder)
        if prev is None:
            self._away[holder] = _Away(now, now, self.backoff_min)
        else:
            self._away[holder] = _Away(now, prev.since, min(prev.backoff * 2, self.backoff_max))

    def reached(self, holder: str) -> None:
        """A grant reached ``holder`` (or it registered again): no backoff any more."""
        self._away.pop(holder, None)

    def reachable(self, holder: str, now: float, last_heard: float) -> bool:
        """May ``holder`` be granted at ``now``?"""
        away = self._away.get(holder)
        if away is None:
            return True
        heard_since = last_heard > away.failed_at
        return now >= away.failed_at + away.backoff or (heard_since and now >= away.failed_at + self.backoff_min)

    def gone(self, holder: str, now: float, last_heard: float) -> bool:
        """Unreachable, and not heard from, for the absent timeout."""
        away = self._away.get(holder)
        if away is None:
            return False
        return now - max(away.since, last_heard) >= self.absent_timeout

    def while_away(self, waiting: Sequence[str], everyone: Sequence[str], now: float, last_heard: Mapping[str, float]) -> WhileAway:
        """What to do when only ``waiting`` (unreachable) holders have work left."""
        if any(self.reachable(h, now, last_heard.get(h, -1.0)) for h in waiting):
            return WhileAway.GO_ON
        if not all(self.gone(h, now, last_heard.get(h, -1.0)) for h in waiting):
            return WhileAway.WAIT
        if any(h in last_heard and now - last_heard[h] < self.absent_timeout for h in everyone):
            return WhileAway.GIVE_UP
        return WhileAway.STOP
