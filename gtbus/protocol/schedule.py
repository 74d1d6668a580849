"""Which holder gets the token next, for which chunk.

Rules:

* Training epochs ("rounds" here, so they are not confused with token epochs)
  go over every chunk of every holder once: round-robin over holders, chunk by
  chunk (h1 c0, h2 c0, h3 c0, h1 c1, ...).
* A chunk is trained at most once per round. A hop that failed (lease expired,
  holder gone, segments did not authenticate, model tampered) puts its chunk
  back at the end of the round, up to ``max_attempts`` tries; after that the
  chunk is skipped for this round and reported.
* The whole state is plain data (:meth:`Schedule.to_state`), saved in every
  checkpoint, so a resumed orchestrator continues where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Assignment:
    """One hop's work: a holder's chunk in a round."""

    round: int
    holder: str
    chunk: int


class Schedule:
    """Round-robin over holders and their chunks, with retries, for ``rounds`` rounds."""

    def __init__(self, chunks: Mapping[str, int], rounds: int, *, max_attempts: int = 2) -> None:
        if rounds < 1:
            raise ValueError("rounds must be at least 1")
        self.chunks = dict(sorted(chunks.items()))
        self.rounds = rounds
        self.max_attempts = max_attempts
        self.round = 0
        self.queue: list[tuple[str, int]] = self._order()
        self.done: set[tuple[str, int]] = set()
        self.attempts: dict[tuple[str, int], int] = {}
        self.skipped: list[tuple[int, str, int]] = []

    def _order(self) -> list[tuple[str, int]]:
        most = max(self.chunks.values(), default=0)
        return [(h, k) for k in range(most) for h, n in self.chunks.items() if k < n]

    def drop_holder(self, holder: str) -> None:
        """Stop scheduling ``holder`` (it left or was removed)."""
        self.queue = [item for item in self.queue if item[0] != holder]

    def next(self) -> Assignment | None:
        """The next hop, or None when every round is done."""
        while True:
            while self.queue:
                holder, chunk = self.queue[0]
                if (holder, chunk) in self.done:
                    self.queue.pop(0)
                    continue
                return Assignment(self.round, holder, chunk)
            if self.round + 1 >= self.rounds:
                return None
            self.round += 1
            self.queue = self._order()
            self.done = set()
            self.attempts = {}

    def complete(self, a: Assignment) -> None:
        """The hop trained its chunk."""
        self._check(a)
        key = (a.holder, a.chunk)
        self.done.add(key)
        if self.queue and self.queue[0] == key:
            self.queue.pop(0)

    def fail(self, a: Assignment) -> bool:
        """The hop failed; True if the chunk will be retried this round."""
        self._check(a)
        key = (a.holder, a.chunk)
        if self.queue and self.queue[0] == key:
            self.queue.pop(0)
        n = self.attempts.get(key, 0) + 1
        self.attempts[key] = n
        if n < self.max_attempts:
            self.queue.append(key)
            return True
        self.skipped.append((a.round, a.holder, a.chunk))
        return False

    def _check(self, a: Assignment) -> None:
        if a.round != self.round:
            raise ValueError(f"assignment of round {a.round}, schedule is in round {self.round}")

    def to_state(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        return {
            "chunks": self.chunks,
            "rounds": self.rounds,
            "max_attempts": self.max_attempts,
            "round": self.round,
            "queue": [list(x) for x in self.queue],
            "done": sorted(list(x) for x in self.done),
            "attempts": [[h, c, n] for (h, c), n in self.attempts.items()],
            "skipped": [list(x) for x in self.skipped],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "Schedule":
        """Rebuild a schedule saved with :meth:`to_state`."""
        s = cls(state["chunks"], state["rounds"], max_attempts=state["max_attempts"])
        s.round = state["round"]
        s.queue = [(h, int(c)) for h, c in state["queue"]]
        s.done = {(h, int(c)) for h, c in state["done"]}
        s.attempts = {(h, int(c)): int(n) for h, c, n in state["attempts"]}
        s.skipped = [(int(r), h, int(c)) for r, h, c in state["skipped"]]
        return s
