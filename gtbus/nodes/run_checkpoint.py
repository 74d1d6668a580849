"""What of a run goes into its checkpoint, and how a resumed orchestrator takes it back.

Rules (DESIGN §7, "Orchestrator dies"):

* A checkpoint holds the model and optimizer (the trainer's state), the run id,
  the last token epoch issued, the schedule's position, every hop so far, the
  first and last evaluation, and each holder's admitted data (token count and
  digest).
* A resumed run never reuses an epoch: it continues above both the checkpoint's
  epoch and every reservation on disk.
* A resumed run admits each holder again only with the same data: its
  enrolment starts empty, so the checkpoint's datasets are what it knows.

The file itself (format, private writes, one reader) is
:mod:`gtbus.training.checkpoint`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from gtbus.errors import ConfigError
from gtbus.nodes.run_summary import HopResult
from gtbus.protocol.schedule import Schedule
from gtbus.training.checkpoint import Checkpoint

if TYPE_CHECKING:  # the shell whose state this is; imported for types only
    from gtbus.nodes.orchestrator import Orchestrator


def run_checkpoint(orch: Orchestrator) -> Checkpoint:
    """The checkpoint of ``orch``'s run as it stands."""
    return Checkpoint.of_trainer_state(
        orch.trainer.state_dict(),
        run_id=orch.run_id,
        epoch=orch.token.epoch,
        schedule=orch.schedule.to_state() if orch.schedule else None,
        hops=[asdict(h) for h in orch.hops],
        datasets={**orch.datasets, **{h: [m.total_tokens, m.digest] for h, m in orch.manifests.items()}},
        first_eval=orch.first_eval,
        last_eval=orch.last_eval,
    )


def resume_run(orch: Orchestrator, ckpt: Checkpoint) -> None:
    """Put ``ckpt``'s run back into ``orch`` (ConfigError naming the file's problem)."""
    orch.trainer.load_state_dict(ckpt.trainer_state())
    orch.run_id = ckpt.run_id
    try:
        orch.schedule = Schedule.from_state(ckpt.schedule) if ckpt.schedule else None
        orch.hops = [HopResult(**h) for h in ckpt.hops]
        orch.datasets = {str(h): [int(n), str(d)] for h, (n, d) in ckpt.datasets.items()}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{orch.checkpoint_path}: unreadable checkpoint ({exc})") from None
    orch.enrolment.known = {h: (n, d) for h, (n, d) in orch.datasets.items()}
    orch.first_eval, orch.last_eval = ckpt.first_eval, ckpt.last_eval
    orch.token.epoch = max(orch.token.epoch, orch.epochs.resume_from(ckpt.epoch))
