"""A lane: one GPU token of the fleet, with everything that travels with it.

Rules:

* A lane is one token (its own :class:`~gtbus.protocol.token.TokenMachine`
  and token id), one device (an emulated device each on the host backend; a
  GPU, or a share of one, on cupy), one trainer replica, one staging pool, and
  at most one hop in flight. Nothing of a lane is shared with another lane:
  a hop's buffers and key live on its lane's device only.
* Epochs are the fleet's, not the lane's: each grant of any lane takes the
  next epoch of one counter (reserved on disk as with one token), so each
  token's epochs strictly increase and no epoch is issued twice.
* A lane whose device fails is *retired* (``failed`` says why): its token is
  never granted again in this process, and its replica takes no part in a
  merge. What it trained that the checkpoint does not hold (``unsaved``) goes
  back to the schedule, as when a hop of the lane rolls back its replica.
* With one lane (``--gpus 1``) the token id is the random one of a single
  token, as before fleets existed; with several each is ``gpu<k>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gtbus.gpu.bounce import BounceSet
from gtbus.gpu.device import Device
from gtbus.nodes.run_summary import HopResult
from gtbus.nodes.staging_pool import StagingPool
from gtbus.protocol.token import TokenMachine
from gtbus.training.trainer import Trainer

if TYPE_CHECKING:  # the runner is the lane's hop in flight; named for types only
    from gtbus.nodes.hop_prepare import PreparedHop
    from gtbus.nodes.hop_runner import HopRunner


def token_id_of(lane: int, lanes: int) -> str | None:
    """The token id of lane ``lane`` of ``lanes`` (None: a random one, for a single token)."""
    return None if lanes == 1 else f"gpu{lane}"


@dataclass(eq=False)
class Lane:
    """One GPU token of the fleet: token, device, trainer replica, staging pool and the hop in flight."""

    index: int
    token: TokenMachine
    device: Device
    trainer: Trainer
    staging: StagingPool
    ship_buf: BounceSet | None = None  # ship mode: the decrypting threads' bounce buffers, sized by the run
    current: HopRunner | None = None  # the hop in flight, or the lane's last one
    hop_started: float | None = None
    trained_since_merge: int = 0  # hops this replica trained that no merge has shared yet
    # Hops this replica trained that the checkpoint does not hold (with K > 1: since the last
    # merge). Thrown away with the replica (a rollback, a retirement), they are trained again.
    unsaved: list[HopResult] = field(default_factory=list)
    failed: str | None = None  # why the lane was retired (its device failed), None while it serves
    # The replica's measurement taken right after its last training, while nothing has written its
    # parameters since (None: measure again). The next hop's grant reports it instead of measuring
    # the same bytes twice, and that hop's remeasure then also covers the time between the hops.
    # Whatever writes a replica's parameters (training, a merge, a rollback, a resume) clears it.
    model_digest: bytes | None = None
    # The next hop's staging, key and sealed params, made while this hop runs (gtbus.nodes.hop_prepare).
    prepared: PreparedHop | None = None

    def measure_model(self) -> bytes:
        """The device's measurement of this lane's replica (the device measures on its own GPU, whatever is current)."""
        return self.device.measure(*self.trainer.parameter_views())

    @property
    def token_id(self) -> str:
        """This lane's token id."""
        return self.token.token_id

    @property
    def busy(self) -> bool:
        """True while a hop of this lane has not finished."""
        return self.current is not None and not self.current.machine.done

    @property
    def in_flight_epoch(self) -> int | None:
        """The epoch of the hop in flight (None: none, or not granted yet)."""
        if not self.busy:
            return None
        assert self.current is not None
        return self.current.machine.epoch or None

    def state(self, orchestrator: str) -> dict[str, Any]:
        """The lane as a snapshot shows it (observers and `gtbus status`)."""
        t = self.token
        return {
            "lane": self.index,
            "id": t.token_id,
            "owner": t.owner or orchestrator,
            "epoch": t.epoch,
            "phase": t.phase.value,
            "hop_started": self.hop_started,
            "failed": self.failed,
        }
