"""Attestation: one :class:`~gtbus.attest.verifier.Verifier` interface and its implementations.

- ``verifier``: the interface and its value types (Evidence, Policy, Claims, revocation).
- ``emulated``: the platform-key verifier (an Ed25519 key stands in for hardware).
- ``policy``: the appraiser's policy file (TOML, strict).
- ``bundle``, ``tdx``, ``nvidia``: the offline bundle and the hardware kinds.

Lower layers (gpu, messages) never import this package; nodes and the CLI do.
"""

from gtbus.attest import verifier as _verifier
from gtbus.attest.verifier import *  # noqa: F403 - the package's public names are the interface's

__all__ = list(_verifier.__all__)  # one list, kept in verifier.py
