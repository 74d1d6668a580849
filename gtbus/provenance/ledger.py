"""What the orchestrator records, hop by hop, for the training manifest: commitments, model digests, merges.

Rules:

* For every hop that trained, the ledger keeps (by epoch) the holder's chunk
  commitment from the ``token.return`` the hop accepted, and the model's
  digest (``device.measure`` over the trainer's parameters, the hop's own
  measurement) before the hop and right after its training. Which hops count
  as trained is the hop records' business (outcome ``trained`` and not
  discarded); the ledger only adds what they do not carry.
* With several lanes (a fleet) hops train on replicas, which are merged from
  time to time: each merge is recorded with the epochs it took in and the
  digest of the merged model, so every hop's "before" is explained by an
  earlier hop's "after", a merge, or the initial model.
* The ledger travels in the run's checkpoint, so a resumed run's manifest is
  complete; each resume notes the epochs issued before the crash that the
  checkpoint does not hold (trained, maybe, and lost with the process).
* Plain data only (hex strings, integers): it is JSON in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gtbus.errors import ConfigError


@dataclass(frozen=True)
class HopProvenance:
    """One trained hop's additions to its record: the holder's commitment and the model digests around it."""

    commitment: bytes
    model_before: bytes
    model_after: bytes


@dataclass(frozen=True)
class MergeRecord:
    """Replicas merged: after ``epoch`` was issued, taking in the hops of ``epochs``; ``model`` is the merged digest."""

    merge: int
    epoch: int
    epochs: tuple[int, ...]
    model: bytes


@dataclass
class ProvenanceLedger:
    """The orchestrator's provenance of a run so far (kept in its checkpoint)."""

    initial_model: bytes = b""
    hops: dict[int, HopProvenance] = field(default_factory=dict)
    merges: list[MergeRecord] = field(default_factory=list)
    # (the checkpoint's epoch, the last epoch issued before the crash): epochs in between were lost with the process
    resumes: list[tuple[int, int]] = field(default_factory=list)

    def trained(self, epoch: int, commitment: bytes, model_before: bytes, model_after: bytes) -> None:
        """Hop ``epoch`` trained on the chunk the holder committed to with ``commitment``."""
        self.hops[epoch] = HopProvenance(commitment, model_before, model_after)

    def merged(self, epoch: int, epochs: list[int], model: bytes) -> MergeRecord:
        """The live replicas were merged into ``model`` after ``epoch``, taking in the hops of ``epochs``."""
        rec = MergeRecord(len(self.merges) + 1, epoch, tuple(sorted(epochs)), model)
        self.merges.append(rec)
        return rec

    def resumed(self, checkpoint_epoch: int, last_issued: int) -> None:
        """A restarted orchestrator resumed from a checkpoint at ``checkpoint_epoch``; epochs up to ``last_issued`` were issued before."""
        if last_issued > checkpoint_epoch:
            self.resumes.append((checkpoint_epoch, last_issued))

    def to_state(self) -> dict[str, Any]:
        """The ledger as plain JSON data (for the checkpoint)."""
        return {
            "initial_model": self.initial_model.hex(),
            "hops": {str(e): [p.commitment.hex(), p.model_before.hex(), p.model_after.hex()] for e, p in sorted(self.hops.items())},
            "merges": [[m.merge, m.epoch, list(m.epochs), m.model.hex()] for m in self.merges],
            "resumes": [list(r) for r in self.resumes],
        }

    @classmethod
    def from_state(cls, state: Any, source: str = "checkpoint") -> ProvenanceLedger:
        """The ledger of :meth:`to_state`; an absent one (a checkpoint of an older gtbus) is empty; ConfigError if malformed."""
        if state is None:
            return cls()
        try:
            return cls(
                initial_model=bytes.fromhex(state["initial_model"]),
                hops={int(e): HopProvenance(*(bytes.fromhex(x) for x in v)) for e, v in state["hops"].items()},
                merges=[MergeRecord(int(n), int(e), tuple(int(x) for x in es), bytes.fromhex(d)) for n, e, es, d in state["merges"]],
                resumes=[(int(a), int(b)) for a, b in state["resumes"]],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{source}: unreadable provenance ({type(exc).__name__}: {exc})") from None
