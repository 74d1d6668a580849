"""Token epochs reserved on disk, so that no epoch is ever issued twice, across crashes too.

Rules:

* Before a grant of epoch ``n`` leaves, ``n`` is covered by a reservation on
  disk: the file holds the highest epoch reserved, written synced, 0600 and
  atomically (:func:`gtbus.private_files.write_private`).
* Epochs are reserved in blocks of :data:`EPOCH_BLOCK`: the fsync is paid once
  per block of hops instead of on each hop's control path. A restart starts
  above the whole block, so epochs a crash left unused are skipped, never reused.
* The resume rule: a restarted orchestrator continues above both its
  reservation and the epoch its checkpoint recorded (:meth:`EpochReservation.resume_from`).
* A fleet's lanes (several GPU tokens) share one reservation and one
  counter: each grant of any lane takes the next epoch, so each token's
  epochs strictly increase and no two tokens ever hold the same epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from gtbus.errors import ConfigError
from gtbus.private_files import write_private

EPOCH_BLOCK: Final = 64  # epochs reserved on disk at a time


class EpochReservation:
    """The highest epoch reserved in ``path``; :meth:`reserve` before each grant.

    ``reserved_upto`` read at start is the highest epoch an earlier process may
    have issued: a new token machine starts there.
    """

    def __init__(self, path: Path, block: int = EPOCH_BLOCK) -> None:
        if block < 1:
            raise ConfigError("an epoch block must hold at least one epoch")
        self.path = path
        self.block = block
        self.reserved_upto = self._read()

    def _read(self) -> int:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.path}: unreadable epoch reservation ({exc})") from None
        try:
            value = int(text or 0)
        except ValueError:
            raise ConfigError(f"{self.path}: not an epoch number") from None
        if value < 0:
            raise ConfigError(f"{self.path}: not an epoch number")
        return value

    def reserve(self, epoch: int) -> None:
        """Make sure ``epoch`` is covered on disk (a write only once per block)."""
        if epoch <= self.reserved_upto:
            return
        upto = epoch + self.block - 1
        write_private(self.path, f"{upto}\n")
        self.reserved_upto = upto

    def resume_from(self, checkpoint_epoch: int) -> int:
        """The epoch a resumed run continues above: never below the reservation or the checkpoint."""
        return max(self.reserved_upto, checkpoint_epoch)
