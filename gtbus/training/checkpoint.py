"""A run's checkpoint file: the trainer's state and the run's meta, in one file.

The one reader and writer of checkpoints: the orchestrator writes one after
every hop and reads it to resume or to roll a hop back; the bench and the
tests read what a run left. Rules:

* The file is an ``.npz``: each array of the trainer's state under ``p.<name>``,
  and ``__meta__``, a JSON document of the run's meta (run id, last epoch,
  schedule, every hop so far, evaluations) and the state's non-array values
  (``scalars``: step counters). Meta is plain data; what it means belongs to
  the layers above (the schedule's state, the hop records).
* Written with :func:`gtbus.private_files.replace_privately`: 0600 from
  creation, synced, renamed into place, so a reader (or a crash) sees the old
  file or the new one, never half of one.
* Reading names the file and what is wrong in one line
  (:class:`~gtbus.errors.ConfigError`), never a traceback; meta alone can be
  read without loading the arrays (a GPT-2 checkpoint is gigabytes).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy

from gtbus.errors import ConfigError
from gtbus.private_files import replace_privately

META_KEY = "__meta__"
ARRAY_PREFIX = "p."


@dataclass
class Checkpoint:
    """What a checkpoint file holds: the run's meta and the trainer's state."""

    run_id: str
    epoch: int  # the last token epoch issued when it was written
    schedule: dict[str, Any] | None = None  # the schedule's plain state
    hops: list[dict[str, Any]] = field(default_factory=list)  # every hop so far, as plain records
    # each holder's admitted data: [token count, digest], so a resumed run admits only the same data
    datasets: dict[str, list[Any]] = field(default_factory=dict)
    first_eval: float | None = None
    last_eval: float | None = None
    provenance: dict[str, Any] | None = None  # the run's provenance ledger (gtbus.provenance.ledger), plain data
    # which workload and device backend trained it: {"trainer": name, "backend": name}, for exports
    workload: dict[str, str] = field(default_factory=dict)
    arrays: dict[str, numpy.ndarray] = field(default_factory=dict)  # empty when read without the state
    scalars: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_trainer_state(cls, state: dict[str, Any], **meta: Any) -> Checkpoint:
        """A checkpoint of a trainer's ``state_dict()`` (arrays and scalars split) with the run's meta."""
        arrays = {k: numpy.asarray(v) for k, v in state.items() if hasattr(v, "shape")}
        scalars = {k: v for k, v in state.items() if not hasattr(v, "shape")}
        return cls(arrays=arrays, scalars=scalars, **meta)

    def trainer_state(self) -> dict[str, Any]:
        """What ``Trainer.load_state_dict`` takes: the arrays and the scalars together."""
        state: dict[str, Any] = dict(self.arrays)
        state.update(self.scalars)
        return state

    def meta(self) -> dict[str, Any]:
        """The JSON document stored beside the arrays."""
        return {
            "run_id": self.run_id,
            "epoch": self.epoch,
            "schedule": self.schedule,
            "hops": self.hops,
            "datasets": self.datasets,
            "scalars": self.scalars,
            "first_eval": self.first_eval,
            "last_eval": self.last_eval,
            "provenance": self.provenance,
            "workload": self.workload,
        }


def write_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint) -> None:
    """Replace the checkpoint at ``path`` (0600, synced, atomically renamed)."""
    meta = numpy.frombuffer(json.dumps(ckpt.meta()).encode(), dtype=numpy.uint8)
    arrays = {f"{ARRAY_PREFIX}{k}": v for k, v in ckpt.arrays.items()}
    with replace_privately(Path(path)) as fh:
        numpy.savez(fh, **{META_KEY: meta}, **arrays)


def read_checkpoint(path: str | os.PathLike[str], *, state: bool = True) -> Checkpoint:
    """The checkpoint at ``path``; with ``state=False`` only its meta (no array is loaded).

    Raises ConfigError naming the file when it is missing or not a checkpoint.
    """
    p = Path(path)
    try:
        with numpy.load(p, allow_pickle=False) as z:
            meta = json.loads(bytes(z[META_KEY]).decode())
            arrays = {k[len(ARRAY_PREFIX):]: z[k] for k in z.files if k.startswith(ARRAY_PREFIX)} if state else {}
        if not isinstance(meta, dict):
            raise ValueError("meta is not a JSON object")
        return Checkpoint(
            run_id=str(meta["run_id"]),
            epoch=int(meta["epoch"]),
            schedule=meta.get("schedule"),
            hops=list(meta.get("hops") or []),
            datasets=dict(meta.get("datasets") or {}),
            first_eval=meta.get("first_eval"),
            last_eval=meta.get("last_eval"),
            provenance=meta.get("provenance"),
            workload={str(k): str(v) for k, v in dict(meta.get("workload") or {}).items()},
            arrays=arrays,
            scalars=dict(meta.get("scalars") or {}),
        )
    except FileNotFoundError:
        raise ConfigError(f"{p}: no checkpoint there") from None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{p}: unreadable checkpoint ({exc})") from None
