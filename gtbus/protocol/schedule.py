"""Which holder gets the token next, for which chunk.

Rules:

* Training epochs ("rounds" here, so they are not confused with token epochs)
  go over every chunk of every holder once: round-robin over holders, chunk by
  chunk (h1 c0, h2 c0, h3 c0, h1 c1, ...).
* A chunk is trained at most once per round. A hop that failed (lease expired,
  segments did not authenticate, model tampered) puts its chunk back at the
  end of the round, up to ``max_attempts`` tries; after that the chunk is
  skipped for this round and reported.
* A hop that never reached its holder (not connected: killed, partitioned,
  paused past its heartbeats) is *deferred*: its chunk goes to the end of the
  round without using up an attempt, so a brief outage loses nothing.
* A holder the caller says is unavailable (backing off after an undelivered
  grant) is passed over: its chunks wait at the end of the round, and the
  others go on. When only unavailable holders have work left, :meth:`next`
  returns None while :attr:`finished` is still False: the caller waits, and
  may :meth:`give_up` on a holder that stays away (its chunks are skipped for
  this round and reported, never silently dropped).
* The state does not grow with a holder's chunk count: the round's order is
  implied (a cursor over holders x chunks), and only chunks put back by a
  failure or deferral, or passed over while their holder is away (at most that
  holder's chunks of the round, which admission bounds), are listed (:meth:`Schedule.to_state`, saved in every
  checkpoint, so a resumed orchestrator continues where it stopped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

_ALWAYS: Callable[[str], bool] = lambda holder: True  # noqa: E731


@dataclass(frozen=True)
class Assignment:
    """One hop's work: a holder's chunk in a round."""

    round: int
    holder: str
    chunk: int


class Schedule:
    """Round-robin over holders and their chunks, with retries and deferrals, for ``rounds`` rounds."""

    def __init__(self, chunks: Mapping[str, int], rounds: int, *, max_attempts: int = 2) -> None:
        if rounds < 1:
            raise ValueError("rounds must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        for holder, n in chunks.items():
            if type(n) is not int or n < 0:
                raise ValueError(f"chunk count of {holder} must be a non-negative int, got {n!r}")
        self.chunks = dict(sorted(chunks.items()))
        self._holders = list(self.chunks)
        self.rounds = rounds
        self.max_attempts = max_attempts
        self.round = 0
        # The round's order is (chunk k, holder i) for k = 0.., i over holders with
        # more than k chunks: the cursor is the next pair not yet handed out.
        self._k = 0
        self._i = 0
        self._most = max(self.chunks.values(), default=0)
        self.requeued: list[tuple[str, int]] = []  # put back this round, in order
        self.attempts: dict[tuple[str, int], int] = {}
        self.skipped: list[tuple[int, str, int]] = []
        self._settle_cursor()

    # -- the implied order ------------------------------------------------------------------

    def _settle_cursor(self) -> None:
        # Move the cursor onto the next pair that exists (a holder with fewer chunks has none at k).
        while self._k < self._most:
            while self._i < len(self._holders):
                if self._k < self.chunks[self._holders[self._i]]:
                    return
                self._i += 1
            self._k += 1
            self._i = 0

    def _at_cursor(self) -> tuple[str, int] | None:
        if self._k >= self._most:
            return None
        return self._holders[self._i], self._k

    def _advance(self) -> None:
        self._i += 1
        self._settle_cursor()

    # -- the caller's view ------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """True when every round is done (nothing left, no round to start)."""
        return self._at_cursor() is None and not self.requeued and self.round + 1 >= self.rounds

    def next(self, available: Callable[[str], bool] = _ALWAYS) -> Assignment | None:
        """The next hop for a holder that is ``available``; None when none is (see :attr:`finished`).

        Stable: until the hop is settled (:meth:`complete`, :meth:`fail`,
        :meth:`defer`) the same assignment comes back, as long as its holder
        stays available.
        """
        while True:
            head = self._at_cursor()
            while head is not None:
                if available(head[0]):
                    return Assignment(self.round, *head)
                # Passed over: it waits at the end of this round; nothing is lost.
                self.requeued.append(head)
                self._advance()
                head = self._at_cursor()
            for holder, chunk in self.requeued:
                if available(holder):
                    return Assignment(self.round, holder, chunk)
            if self.requeued or self.round + 1 >= self.rounds:
                return None
            self._start_round(self.round + 1)

    def _start_round(self, r: int) -> None:
        self.round = r
        self._k = self._i = 0
        self.requeued = []
        self.attempts = {}
        self._settle_cursor()

    def _take(self, a: Assignment) -> tuple[str, int]:
        if a.round != self.round:
            raise ValueError(f"assignment of round {a.round}, schedule is in round {self.round}")
        key = (a.holder, a.chunk)
        if self._at_cursor() == key:
            self._advance()
        elif key in self.requeued:
            self.requeued.remove(key)
        else:
            raise ValueError(f"{a.holder} chunk {a.chunk} is not pending in round {a.round}")
        return key

    def complete(self, a: Assignment) -> None:
        """The hop trained its chunk."""
        self._take(a)

    def fail(self, a: Assignment) -> bool:
        """The hop failed; True if the chunk will be retried this round."""
        key = self._take(a)
        n = self.attempts.get(key, 0) + 1
        self.attempts[key] = n
        if n < self.max_attempts:
            self.requeued.append(key)
            return True
        self.skipped.append((a.round, a.holder, a.chunk))
        return False

    def defer(self, a: Assignment) -> None:
        """The hop never reached its holder: try the chunk again at the end of the round, no attempt used."""
        self.requeued.append(self._take(a))

    def reopen(self, a: Assignment) -> None:
        """A completed hop's training was thrown away (its replica was rolled back): the chunk goes back, untrained.

        Only a chunk of this round that was handed out and is not pending again; it
        waits at the end of the round like a deferred one, no attempt used.
        """
        if a.round != self.round:
            raise ValueError(f"cannot reopen {a.holder} chunk {a.chunk} of round {a.round}: the schedule is in round {self.round}")
        key = (a.holder, a.chunk)
        if not 0 <= a.chunk < self.chunks.get(a.holder, 0):
            raise ValueError(f"{a.holder} has no chunk {a.chunk}")
        handed_out = a.chunk < self._k or (a.chunk == self._k and self._holders.index(a.holder) < self._i)
        if not handed_out or key in self.requeued or any(s[1:] == key for s in self.skipped if s[0] == self.round):
            raise ValueError(f"{a.holder} chunk {a.chunk} of round {a.round} is not a completed hop")
        self.requeued.append(key)

    def give_up(self, holder: str) -> list[Assignment]:
        """Skip ``holder``'s chunks that were put back this round (it stayed away); what was skipped."""
        mine = [(h, c) for h, c in self.requeued if h == holder]
        self.requeued = [item for item in self.requeued if item[0] != holder]
        self.skipped.extend((self.round, h, c) for h, c in mine)
        return [Assignment(self.round, h, c) for h, c in mine]

    def pending_holders(self) -> list[str]:
        """Holders with work left in this round (sorted), for naming who a run is waiting for."""
        left = {h for h, _ in self.requeued}
        head = self._at_cursor()
        if head is not None:
            left.update(h for h, n in self.chunks.items() if n > self._k)
        return sorted(left)

    def to_state(self) -> dict[str, Any]:
        """Plain data for a checkpoint (its size depends on failures, not on chunk counts)."""
        return {
            "chunks": self.chunks,
            "rounds": self.rounds,
            "max_attempts": self.max_attempts,
            "round": self.round,
            "cursor": [self._k, self._i],
            "requeued": [list(x) for x in self.requeued],
            "attempts": [[h, c, n] for (h, c), n in self.attempts.items()],
            "skipped": [list(x) for x in self.skipped],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "Schedule":
        """Rebuild a schedule saved with :meth:`to_state` (ValueError if it is not one)."""
        try:
            s = cls(state["chunks"], state["rounds"], max_attempts=state["max_attempts"])
            s.round = int(state["round"])
            s._k, s._i = (int(x) for x in state["cursor"])
            s.requeued = [(str(h), int(c)) for h, c in state["requeued"]]
            s.attempts = {(str(h), int(c)): int(n) for h, c, n in state["attempts"]}
            s.skipped = [(int(r), str(h), int(c)) for r, h, c in state["skipped"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a saved schedule: {exc!r}") from None
        if not 0 <= s.round < s.rounds or s._k < 0 or not 0 <= s._i <= len(s._holders):
            raise ValueError("not a saved schedule: cursor out of range")
        s._settle_cursor()
        return s
