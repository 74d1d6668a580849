"""Per-peer budgets: how much each authenticated peer may make a node do.

A node judges every message it receives (parse, verify, record), so a peer
that sends as fast as it can decides that node's CPU and log growth. This
module bounds both, per peer, with no I/O (the clock is injected):

* **Rate and bytes.** Each peer has two token buckets, messages and bytes,
  filled at a steady rate up to a burst. A message is admitted only if both
  hold enough, and then takes from both. What a peer may send depends on its
  role (:data:`ROLE_BUDGETS`): holders stream bulk segments, observers ask
  for status.
* **Records of refusals.** A refused message (over budget, or refused by the
  receive pipeline) is written to the log at most ``records_per_s`` times a
  second per peer; the others are counted, and the next record says how many
  went unrecorded before it. So one peer grows a log by a bounded number of
  records a second, whatever it sends.
* **Bounded state.** One entry per peer name, and names are authenticated
  (the deployment's roster); an unauthenticated sender shares one entry.

Budgets are checked before the receive pipeline does any work on a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gtbus.clock import Clock
from gtbus.messages.identity import Role

__all__ = ["ROLE_BUDGETS", "Budget", "PeerBudgets", "RecordGate", "TokenBucket"]


@dataclass(frozen=True)
class Budget:
    """What one peer may send: sustained rates and bursts, of messages and of bytes."""

    messages_per_s: float
    message_burst: float
    bytes_per_s: float
    byte_burst: float

    def __post_init__(self) -> None:
        for name in ("messages_per_s", "message_burst", "bytes_per_s", "byte_burst"):
            if not getattr(self, name) > 0:
                raise ValueError(f"budget {name} must be positive")


#: Per role. Holders and device agents carry bulk: a ship or remote hop streams
#: 1-4 MiB segments as fast as the network goes (a GPU host takes 5-20 GB/s), so
#: their budgets only stop the absurd (a node here judges about 5,000 signed
#: messages a second); what bounds their log growth is the refusal-record gate
#: and the protocol itself. Observers ask for status and echoes.
_BULK = Budget(messages_per_s=20_000, message_burst=20_000, bytes_per_s=32 << 30, byte_burst=256 << 20)
ROLE_BUDGETS: dict[Role, Budget] = {
    Role.HOLDER: _BULK,
    Role.AGENT: _BULK,
    Role.OBSERVER: Budget(messages_per_s=20, message_burst=40, bytes_per_s=64 << 10, byte_burst=256 << 10),
    Role.ORCHESTRATOR: _BULK,
}
#: For a sender the roster does not know (refused by the pipeline anyway).
UNKNOWN_BUDGET = ROLE_BUDGETS[Role.OBSERVER]


class TokenBucket:
    """Holds up to ``burst`` tokens, refilled at ``rate`` a second; ``take`` succeeds if enough are there."""

    __slots__ = ("burst", "level", "rate", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.stamp = now

    def refill(self, now: float) -> None:
        """Add what accrued since the last look (a clock going backwards adds nothing)."""
        if now > self.stamp:
            self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, amount: float, now: float) -> bool:
        """Take ``amount`` tokens if there are that many; True if taken."""
        self.refill(now)
        if self.level >= amount:
            self.level -= amount
            return True
        return False


class RecordGate:
    """Lets at most ``per_s`` refusals a second (burst ``burst``) of one peer into the log.

    ``admit()`` returns ``None`` for a refusal not to record, or the number of
    refusals left unrecorded since the last recorded one.
    """

    __slots__ = ("bucket", "unrecorded")

    def __init__(self, per_s: float, burst: float, now: float) -> None:
        self.bucket = TokenBucket(per_s, burst, now)
        self.unrecorded = 0

    def admit(self, now: float) -> int | None:
        if self.bucket.take(1, now):
            skipped, self.unrecorded = self.unrecorded, 0
            return skipped
        self.unrecorded += 1
        return None


@dataclass
class _Peer:
    messages: TokenBucket
    bytes: TokenBucket
    records: RecordGate
    refused: int = 0


class PeerBudgets:
    """Message, byte and refusal-record budgets of every peer of one node."""

    def __init__(
        self,
        budget_of: Callable[[str], Budget],
        clock: Clock,
        *,
        records_per_s: float = 10.0,
        record_burst: float = 20.0,
    ) -> None:
        self._budget_of = budget_of
        self._clock = clock
        self._records_per_s = records_per_s
        self._record_burst = record_burst
        self._peers: dict[str, _Peer] = {}

    def _peer(self, name: str) -> _Peer:
        p = self._peers.get(name)
        if p is None:
            b = self._budget_of(name)
            now = self._clock.monotonic()
            p = self._peers[name] = _Peer(
                TokenBucket(b.messages_per_s, b.message_burst, now),
                TokenBucket(b.bytes_per_s, b.byte_burst, now),
                RecordGate(self._records_per_s, self._record_burst, now),
            )
        return p

    def admit(self, peer: str, nbytes: int) -> bool:
        """Charge one message of ``nbytes`` to ``peer``; False (and counted) if over its budget."""
        p = self._peer(peer)
        now = self._clock.monotonic()
        p.messages.refill(now)
        p.bytes.refill(now)
        if p.messages.level >= 1 and p.bytes.level >= nbytes:
            p.messages.level -= 1
            p.bytes.level -= nbytes
            return True
        p.refused += 1
        return False

    def record_refusal(self, peer: str) -> int | None:
        """May a refusal of ``peer``'s be recorded now? ``None``: no; else how many went unrecorded before it."""
        return self._peer(peer).records.admit(self._clock.monotonic())

    def refused(self) -> dict[str, int]:
        """Messages refused over budget, per peer."""
        return {name: p.refused for name, p in self._peers.items() if p.refused}

    def unrecorded(self) -> dict[str, int]:
        """Refusals not (yet) in the log, per peer."""
        return {name: p.records.unrecorded for name, p in self._peers.items() if p.records.unrecorded}


def role_budgets(role_of: Callable[[str], Role | None]) -> Callable[[str], Budget]:
    """``budget_of`` for :class:`PeerBudgets` from a name-to-role lookup, using :data:`ROLE_BUDGETS`."""

    def budget_of(name: str) -> Budget:
        role = role_of(name)
        return ROLE_BUDGETS.get(role, UNKNOWN_BUDGET) if role is not None else UNKNOWN_BUDGET

    return budget_of
