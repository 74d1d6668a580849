"""The next hop made ready while this one runs: its staging, key and sealed params, sent ahead to its holder.

A hop's fixed cost is mostly serial work on both sides of the grant: the
orchestrator seals the params to the holder (an X25519 sealed box), the holder
opens them and maps the staging they name (on cupy, a CUDA IPC open whose first
copy pays the mapping's first touch). All of it can be done while the hop before
runs and both sides wait. Rules:

* **A guess, never authority.** :meth:`FleetSchedule.likely_next` names the
  holder and chunk the lane is handed if the hop in flight completes. The hop
  that is really assigned takes the prepared parts only if holder and chunk
  match; otherwise they are released unused and the hop makes its own.
* **A staging named to one holder is never granted to another**: the holder the
  guess named may have mapped it and could still write into it.
* **The grant is unchanged and self-contained**: it carries the same sealed
  params, its report is verified before a byte is written, and a holder that
  ignored or lost the :class:`~gtbus.messages.types.HopPrepare` works as before.
* **Where it is made**: travel mode, a single lane, a holder that writes the
  staging itself. A fleet's lanes start hops as others end, in an order no
  one lane can guess; a holder behind a device agent is staged by the agent at
  grant time (:mod:`gtbus.protocol.agent_stage`).
* One prepared hop per lane. Its staging is tracked live like every export (a
  restart after kill -9 removes it) and released with the pool's spares at the
  run's end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gtbus.gpu.channel import ChannelParams
from gtbus.gpu.sealing import seal_params
from gtbus.protocol.schedule import Assignment

if TYPE_CHECKING:
    from gtbus.nodes.lane import Lane
    from gtbus.nodes.run_config import RunConfig


@dataclass(eq=False)
class PreparedHop:
    """A hop's parts made before its grant: for ``holder``'s ``chunk`` only."""

    holder: str
    chunk: int
    staging: Any
    handle: Any
    params: ChannelParams
    sealed: bytes


@dataclass
class PrepareCounts:
    """What the guesses were worth in a run (the summary's ``prepared_hops``)."""

    made: int = 0
    used: int = 0
    discarded: int = 0

    def as_dict(self) -> dict[str, int]:
        """For the run summary."""
        return {"made": self.made, "used": self.used, "discarded": self.discarded}


def prepare_hop(lane: Lane, a: Assignment, cfg: RunConfig, holder_x25519: bytes) -> PreparedHop:
    """Take the lane's next fresh staging, make a key for it and seal both to ``a``'s holder."""
    staging, handle = lane.staging.take_staging(cfg.staging_bytes)
    try:
        params = cfg.hop_params(handle)
        return PreparedHop(a.holder, a.chunk, staging, handle, params, seal_params(params, holder_x25519))
    except BaseException:
        lane.staging.release_staging(staging, handle)
        raise


def take_prepared(lane: Lane, a: Assignment, nbytes: int, counts: PrepareCounts) -> PreparedHop | None:
    """The lane's prepared hop if it was made for ``a``'s holder and chunk at this size; else release it, None."""
    p, lane.prepared = lane.prepared, None
    if p is None:
        return None
    if (p.holder, p.chunk) == (a.holder, a.chunk) and p.staging.nbytes == nbytes:
        counts.used += 1
        return p
    counts.discarded += 1
    lane.staging.retire(p.staging, p.handle, p.holder)  # the guessed holder may have mapped it
    return None


def release_prepared(lane: Lane, counts: PrepareCounts) -> None:
    """Release the lane's prepared hop, if any (the run ends, or the guess is dropped)."""
    p, lane.prepared = lane.prepared, None
    if p is not None:
        counts.discarded += 1
        lane.staging.retire(p.staging, p.handle, p.holder)  # the pool's release_spares frees it at the run's end
