"""What a run did, hop by hop and in total, and which part of it each audience may see.

Rules:

* A :class:`HopResult` is what one hop did. It is kept in the checkpoint,
  printed as a hop line, and published: everyone learns the hop's public line
  (:data:`~gtbus.messages.types.HOP_PUBLIC_FIELDS`); only the hop's own holder
  and the observers learn its metrics (losses, timings), which would tell a
  holder something about other holders' data.
* The run summary (what ``gtbus demo --json`` prints) is computed from the hops
  alone; broadcast at the end it is cut to
  :data:`~gtbus.messages.types.RUN_PUBLIC_FIELDS`.
* A snapshot for a holder is cut to
  :data:`~gtbus.messages.types.SNAPSHOT_PUBLIC_FIELDS`; observers get all of it.
* Anything published is plain JSON scalars (:func:`jsonable`). A hop's phase
  marks (:mod:`gtbus.nodes.hop_phases`) stay in the checkpoint and the run's
  own summary; they are not published.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from gtbus.messages.types import HOP_PUBLIC_FIELDS, RUN_PUBLIC_FIELDS, SNAPSHOT_PUBLIC_FIELDS
from gtbus.protocol.hop import HopOutcome


@dataclass
class HopResult:
    """What one hop did (published as a HopRecord, kept in the checkpoint)."""

    epoch: int
    round: int
    holder: str
    chunk: int
    mode: str
    outcome: str
    nbytes: int = 0
    segments: int = 0
    provision_s: float = 0.0
    open_s: float = 0.0
    train_s: float = 0.0
    eval_s: float = 0.0  # held-out evaluations before and after training (not part of train_s)
    epilogue_s: float = 0.0
    loss_first: float | None = None
    loss_last: float | None = None
    eval_before: float | None = None  # loss on the chunk before training on it (unseen data in round 0)
    eval_after: float | None = None
    detail: str = ""
    phases: dict[str, float] = field(default_factory=dict)  # orchestrator phase marks, s since the hop began
    lane: int = 0  # the fleet's lane (GPU token) the hop ran on
    token_id: str = ""
    discarded: bool = False  # trained, but its replica was rolled back or retired: the chunk was trained again

    @property
    def transfer_s(self) -> float:
        """Time from grant to plaintext in the device buffer."""
        return self.provision_s + self.open_s


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with every value a JSON scalar (anything else as its ``str``)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in d.items()}


def hop_record(h: HopResult) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the whole record, for the hop's holder and observers; its public part, for everyone)."""
    record = jsonable({k: v for k, v in asdict(h).items() if k != "phases"})
    return record, {k: v for k, v in record.items() if k in HOP_PUBLIC_FIELDS}


def trained(hops: Iterable[HopResult]) -> list[HopResult]:
    """The hops whose chunk was trained on."""
    return [h for h in hops if h.outcome == HopOutcome.TRAINED]


def run_summary(
    hops: list[HopResult], *, run_id: str, mode: str, device: str, first_eval: float | None, last_eval: float | None, **more: Any
) -> dict[str, Any]:
    """The run's numbers from its hops; ``more`` (last epoch, paths...) is appended as given."""
    done = trained(hops)
    transfer = sum(h.transfer_s for h in done)
    train = sum(h.train_s for h in done)
    nbytes = sum(h.nbytes for h in done)
    return {
        "run_id": run_id,
        "mode": mode,
        "device": device,
        "hops": len(hops),
        "hops_trained": len(done),
        "outcomes": {o: sum(1 for h in hops if h.outcome == o) for o in sorted({h.outcome for h in hops})},
        # Held-out measure: each chunk is evaluated before it is trained on.
        "first_loss": first_eval,
        "last_loss": last_eval,
        "final_train_loss": done[-1].eval_after if done else None,
        "bytes_provisioned": nbytes,
        "transfer_s": transfer,
        "train_s": train,
        "eval_s": sum(h.eval_s for h in done),
        "transfer_share": transfer / (transfer + train) if (transfer + train) > 0 else 0.0,
        "provision_gbps": nbytes / transfer / 1e9 if transfer > 0 else 0.0,
        **more,
    }


def fleet_summary(hops: list[HopResult], *, gpus: int, merges: int, merge_s: float, failed: list[dict[str, Any]]) -> dict[str, Any]:
    """The fleet's part of a run summary: lanes, hops settled on each, merges, and the lanes that failed."""
    return {
        "gpus": gpus,
        "hops_per_gpu": [sum(1 for h in hops if h.lane == k) for k in range(gpus)],
        "trained_per_gpu": [sum(1 for h in trained(hops) if h.lane == k) for k in range(gpus)],
        "merges": merges,
        "merge_s": merge_s,
        "lanes_failed": failed,
    }


def public_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The part of a run summary broadcast to every node."""
    return {k: v for k, v in summary.items() if k in RUN_PUBLIC_FIELDS}


def hop_progress(hops: list[HopResult]) -> dict[str, Any]:
    """The snapshot's hop counters: hops, hops trained, bytes trained, and the epoch of the last loss."""
    done = trained(hops)
    return {
        "hops": len(hops),
        "hops_trained": len(done),
        "bytes": sum(h.nbytes for h in done),
        "last_loss_epoch": next((h.epoch for h in reversed(done) if h.eval_before is not None), None),
    }


def public_snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """The part of a snapshot a holder may see."""
    return {k: v for k, v in state.items() if k in SNAPSHOT_PUBLIC_FIELDS}
