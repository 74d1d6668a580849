"""The holder's side of a hop prepared ahead (:mod:`gtbus.nodes.hop_prepare`): params opened, staging mapped, before the grant.

Rules:

* Only the orchestrator's own preparation, for this holder and this run, is
  taken; anything else is refused in one line and nothing is kept.
* **Nothing is written.** The params are opened and the staging they name is
  mapped and read once (on cupy the first use of a fresh IPC mapping pays its
  setup, ~0.3 ms on the H200 host, which would otherwise fall inside the hop).
  Data goes out only once a grant's report has verified, as without a
  preparation.
* One at a time: a newer preparation, or a grant whose sealed params differ,
  drops (unmaps) the one kept; so does the run's end.
* A grant uses it only when its sealed params are byte-identical to the
  prepared ones: the grant is authoritative, the preparation only saved work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gtbus.gpu.channel import ChannelParams
from gtbus.gpu.device import HolderStaging
from gtbus.gpu.sealing import open_params


@dataclass(eq=False)
class PreparedStaging:
    """A prepared hop as the holder keeps it: the sealed params as sent, opened, and their staging mapped."""

    sealed: bytes
    params: ChannelParams
    mapping: Any

    def matches(self, sealed: bytes) -> bool:
        """Is this the preparation of a grant carrying ``sealed``?"""
        return self.sealed == sealed


def open_prepared(sealed: bytes, x25519_secret: bytes, staging: HolderStaging) -> PreparedStaging:
    """Open ``sealed``, map its staging and read one byte of it; ChannelError or DeviceError (one line) if either fails."""
    params = open_params(sealed, x25519_secret)
    mapping = staging.map_staging(params.buffer_handle)
    try:
        mapping.read_back(1)
    except BaseException:
        staging.unmap(mapping)
        raise
    return PreparedStaging(bytes(sealed), params, mapping)
