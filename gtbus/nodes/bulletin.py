"""Who learns what of a run: the public line for everyone, the metrics for a hop's holder and the observers.

Rules (DESIGN §7, "what a holder receives tells it nothing about other
holders' data"):

* Everyone (holders included) gets the public schedule by broadcast: the hop's
  holder, chunk, epoch, outcome and size (``hop.record``), and the run's public
  summary.
* A hop's metrics (losses on the holder's chunk, timings, refusal details) go
  directly, as ``hop.report``, to that hop's holder and to the observers that
  asked for a snapshot, and to nobody else.
* A snapshot carries metrics only for an observer; a holder's has the public
  part. The set of following observers is bounded, and an observer that is
  gone stops following at the first send that fails.
"""

from __future__ import annotations

from typing import Any, Callable, Final

from gtbus.errors import TransportError
from gtbus.messages.identity import Role
from gtbus.messages.types import HopRecord, HopReport, RunComplete, Snapshot
from gtbus.nodes.run_summary import HopResult, hop_record, public_snapshot, public_summary
from gtbus.nodes.runtime import NodeRuntime

#: Observers that may follow a run's metrics at once (only observer keys can, and few exist).
MAX_FOLLOWERS: Final = 64


class Bulletin:
    """Publishes a run's hop records, reports, snapshots and summary to whoever may learn them."""

    def __init__(self, rt: NodeRuntime, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.rt = rt
        self._snapshot = snapshot  # the whole state now, metrics included
        self.followers: set[str] = set()

    def snapshot_for(self, name: str) -> dict[str, Any]:
        """The snapshot ``name`` may see (and an observer becomes a follower of the metrics)."""
        member = self.rt.roster.get(name)
        observer = member is not None and member.role is Role.OBSERVER
        if observer and len(self.followers) < MAX_FOLLOWERS:
            self.followers.add(name)
        state = self._snapshot()
        return state if observer else public_snapshot(state)

    async def answer_snapshot(self, name: str, parent: bytes) -> None:
        """Answer a snapshot request with what ``name`` may see and the event sequence it continues from."""
        seq = self.rt.signer._seq.get("*", 0)
        await self.rt.send(Snapshot(self.snapshot_for(name), seq), name, parent=parent)

    async def tell(self, msg: object, to: list[str], *, epoch: int = 0) -> None:
        """Send ``msg`` directly to each of ``to`` that is connected; an observer that is gone stops following."""
        for name in dict.fromkeys(to):
            try:
                await self.rt.send(msg, name, epoch=epoch)
            except TransportError:
                self.followers.discard(name)

    async def hop(self, out: HopResult) -> None:
        """Everyone learns the hop's public line; its holder and the observers learn its metrics."""
        record, public = hop_record(out)
        await self.rt.publish(HopRecord(out.epoch, out.holder, out.chunk, out.outcome, public), epoch=out.epoch)
        await self.tell(HopReport(out.epoch, out.holder, out.chunk, out.outcome, record), [out.holder, *sorted(self.followers)], epoch=out.epoch)

    async def run_complete(self, summary: dict[str, Any]) -> None:
        """Observers get the whole summary; the broadcast carries its public part."""
        await self.tell(RunComplete(summary), sorted(self.followers))
        await self.rt.publish(RunComplete(public_summary(summary)))
