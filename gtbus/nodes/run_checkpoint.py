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
* A checkpoint holds exactly the hops its model holds: it is written only
  where every serving replica's training is in the model saved (with one
  lane, after a hop; a fleet, right after a merge, and a merge comes at every
  round's end), so the chunks its schedule counts as done are the model's,
  and a resume does everything after it again. A trained hop whose training
  was thrown away with its replica (rolled back, retired) says ``discarded``
  in its record; its chunk was put back into the round before the checkpoint.
* The run's provenance ledger (:mod:`gtbus.provenance.ledger`: each trained
  hop's chunk commitment and model digests, the merges) is kept beside the
  hops, so a resumed run's manifest lists every hop its model holds; a resume
  notes the epochs issued before the crash that the checkpoint does not hold.
* A fleet (K lanes) is checkpointed only where no hop is in flight, right
  after a merge: the first serving lane's trainer state is stored as a single
  model's (so a one-GPU run resumes it), and every other serving lane's whole
  state (the same parameters, its own optimizer moments) under
  ``fleet.lane<k>/``; each lane's last token epoch is kept as
  ``fleet.lane_epochs``. The schedule is the fleet schedule's state (no lane
  holds anything there). A lane the checkpoint has no state for (a resume with
  more lanes, or a lane that had failed) starts from the first's. With one
  lane the checkpoint is exactly a single token's.

The file itself (format, private writes, one reader) is
:mod:`gtbus.training.checkpoint`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Final

from gtbus.errors import ConfigError
from gtbus.nodes.run_summary import HopResult
from gtbus.protocol.fleet import FleetSchedule
from gtbus.protocol.schedule import Schedule
from gtbus.provenance.ledger import ProvenanceLedger
from gtbus.training.checkpoint import Checkpoint

if TYPE_CHECKING:  # the shell whose state this is; imported for types only
    from gtbus.nodes.orchestrator import Orchestrator

#: Keys of the fleet's own entries in a checkpoint's trainer state (no trainer's key starts so).
FLEET_PREFIX: Final = "fleet."
LANE_EPOCHS: Final = FLEET_PREFIX + "lane_epochs"


def _lane_prefix(k: int) -> str:
    return f"{FLEET_PREFIX}lane{k}/"


def lane_state(state: dict[str, Any], k: int) -> dict[str, Any]:
    """Lane ``k``'s trainer state out of a checkpoint's: its own if stored, else the first lane's."""
    prefix = _lane_prefix(k)
    own = {key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)}
    return own or {key: v for key, v in state.items() if not key.startswith(FLEET_PREFIX)}


def run_checkpoint(orch: Orchestrator) -> Checkpoint:
    """The checkpoint of ``orch``'s run as it stands (with lanes: no hop in flight, replicas just merged)."""
    serving = [lane for lane in orch.lanes if lane.failed is None]
    first, *rest = serving
    state = dict(first.trainer.state_dict())
    for lane in rest:
        state.update({_lane_prefix(lane.index) + key: v for key, v in lane.trainer.state_dict().items()})
    fleet = len(orch.lanes) > 1
    if fleet:
        state[LANE_EPOCHS] = [lane.token.epoch for lane in orch.lanes]
    schedule = None
    if orch.fleet is not None:
        schedule = orch.fleet.to_state() if fleet else orch.fleet.schedule.to_state()
    elif orch.schedule is not None:
        schedule = orch.schedule.to_state()
    return Checkpoint.of_trainer_state(
        state,
        run_id=orch.run_id,
        epoch=orch.last_epoch,
        schedule=schedule,
        hops=[asdict(h) for h in orch.hops],
        datasets={**orch.datasets, **{h: [m.total_tokens, m.digest] for h, m in orch.manifests.items()}},
        first_eval=orch.first_eval,
        last_eval=orch.last_eval,
        provenance=orch.provenance.to_state(),
        workload={"trainer": orch.config.trainer, "backend": orch.device.name},
    )


def _fleet_of(saved: dict[str, Any], lanes: int) -> FleetSchedule:
    # A fleet's state names its lanes; a single token's is the Schedule's own.
    if "lanes" in saved:
        return FleetSchedule.from_state(saved, lanes=lanes)
    return FleetSchedule(Schedule.from_state(saved), lanes)


def resume_run(orch: Orchestrator, ckpt: Checkpoint) -> None:
    """Put ``ckpt``'s run back into ``orch`` (ConfigError naming the file's problem)."""
    state = ckpt.trainer_state()
    for lane in orch.lanes:
        lane.model_digest = None
        with lane.device.active():
            lane.trainer.load_state_dict(lane_state(state, lane.index))
    orch.run_id = ckpt.run_id
    # Epochs up to the reservation may have been issued (and trained) before the crash: the checkpoint holds none after its own.
    orch.provenance = ProvenanceLedger.from_state(ckpt.provenance, str(orch.checkpoint_path))
    orch.provenance.resumed(ckpt.epoch, orch.epochs.reserved_upto)
    try:
        if ckpt.schedule:
            orch.fleet = _fleet_of(ckpt.schedule, len(orch.lanes))
            orch.schedule = orch.fleet.schedule
        orch.hops = [HopResult(**h) for h in ckpt.hops]
        orch.datasets = {str(h): [int(n), str(d)] for h, (n, d) in ckpt.datasets.items()}
        lane_epochs = [int(e) for e in state.get(LANE_EPOCHS, [])]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{orch.checkpoint_path}: unreadable checkpoint ({exc})") from None
    orch.enrolment.known = {h: (n, d) for h, (n, d) in orch.datasets.items()}
    orch.first_eval, orch.last_eval = ckpt.first_eval, ckpt.last_eval
    orch.last_epoch = max(orch.last_epoch, orch.epochs.resume_from(ckpt.epoch))
    for lane, epoch in zip(orch.lanes, lane_epochs):
        lane.token.epoch = max(lane.token.epoch, epoch)
    for lane in orch.lanes:
        lane.token.epoch = max(lane.token.epoch, orch.last_epoch)
