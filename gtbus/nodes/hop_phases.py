"""Where a hop's time goes: a few named monotonic marks per hop, on each side.

Rules:

* A side's phases are a fixed tuple of names (:data:`ORCHESTRATOR_PHASES`,
  :data:`HOLDER_PHASES`); a mark with another name is ignored, and only the
  first mark of a name counts. A hop's marks are therefore at most one float
  per name, whatever a peer sends (a repeated ack cannot grow them).
* A mark is the seconds since the side's start of the hop (``time.perf_counter``,
  the system's monotonic clock), taken when the phase *ended*; the time a phase
  took is the gap to the mark before it in time (:func:`durations`): messages
  may arrive while the shell still works (an ack before the token state is out).
* Marks are measurements only: nothing decides on them.
"""

from __future__ import annotations

import time
from typing import Final

#: The orchestrator's hop, in order: buffers and key before the grant, the grant's
#: own work, what comes back, then the work after the return.
ORCHESTRATOR_PHASES: Final = (
    "staging_alloc",  # this hop's fresh staging and the private buffer taken
    "key",  # fresh channel key and params
    "model_measure",  # model digest at the grant (taken after the lane's last training where nothing wrote it since)
    "epoch_reserve",  # epoch on disk, receive fence raised
    "seal_params",  # params sealed to the holder
    "report_sign",  # measurement report signed (commits to the key)
    "grant_sent",
    "state_published",  # token state to subscribers
    "ack_received",
    "return_received",
    "open",  # authenticate + decrypt into the private buffer, staging scrubbed and revoked
    "remeasure",
    "train",  # evaluate, train, evaluate
    "model_after",  # model digest after training (the manifest's, and the next grant's)
    "scrub",  # scrub + verify zero + release, key dropped
    "checkpoint",
    "publish",  # hop record published
)

#: The holder's hop, in order, from the grant's arrival to the return sent.
HOLDER_PHASES: Final = (
    "params_opened",  # sealed channel params opened with the holder's X25519 key
    "report_verified",  # measurement report: platform signature, pin, key commitment
    "ack_sent",
    "chunk_read",  # the chunk as contiguous little-endian tokens in memory
    "map",  # staging mapped
    "seal",  # sealed into the staging
    "return_sent",
    "unmap",  # after the return is on its way (off the hop's critical path)
)
#: What the holder's hop line (written as the return is sent) can show: all but the unmap.
RETURN_LINE_PHASES: Final = HOLDER_PHASES[:-1]


class PhaseClock:
    """The marks of one hop on one side, against ``names``; started when built."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.t0 = time.perf_counter()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        """Note that phase ``name`` ended now (only its first mark counts; unknown names are ignored)."""
        if name in self.names and name not in self.marks:
            self.marks[name] = time.perf_counter() - self.t0

    def as_dict(self) -> dict[str, float]:
        """The marks in the side's order, seconds since the hop's start (microsecond resolution)."""
        return {n: round(self.marks[n], 6) for n in self.names if n in self.marks}


def durations(marks: dict[str, float]) -> list[tuple[str, float]]:
    """(phase, seconds it took) for each mark, in time order: the gap to the mark before it."""
    out, last = [], 0.0
    for n, t in sorted(marks.items(), key=lambda kv: kv[1]):
        out.append((n, t - last))
        last = t
    return out


def describe(marks: dict[str, float]) -> str:
    """One line a person reads: ``name 0.12`` per phase, in milliseconds, in time order."""
    return ", ".join(f"{n} {s * 1e3:.2f}" for n, s in durations(marks))


def parse_described(text: str) -> list[tuple[str, float]]:
    """The (phase, seconds) pairs of a :func:`describe` line (pairs that do not parse are left out)."""
    out = []
    for part in text.split(", "):
        name, _, ms = part.rpartition(" ")
        try:
            out.append((name, float(ms) / 1e3))
        except ValueError:
            continue
    return [(n, s) for n, s in out if n]
