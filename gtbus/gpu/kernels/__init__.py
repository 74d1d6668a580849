"""CUDA kernels for the cupy backend, compiled at first use with cupy's RawModule.

* ``aes_gcm``: AES-256-GCM decrypt and tag check of a hop's staged segments
  (the GPU side of the "bounce buffer" of DESIGN.md section 2).
* ``blake3``: BLAKE3-256 of a device buffer (model and code measurement).
* ``scrub``: zero a buffer and verify on the device that it reads zero.

cupy is imported lazily, so importing this package works without it; calling
a kernel then raises ``gtbus.errors.DeviceError``. The host-side helpers
(``_gf128``: key schedule, GHASH arithmetic; ``blake3.blake3_tree_model``) are
pure Python and also serve as models in tests.
"""

from __future__ import annotations

from gtbus.gpu.kernels.aes_gcm import (
    GcmDecryptor,
    SegmentSpec,
    decrypt_segments,
    decrypt_segments_or_scrub,
    first_bad_segment,
    segment_nonce,
)
from gtbus.gpu.kernels.blake3 import blake3_digest, blake3_digest_device
from gtbus.gpu.kernels.scrub import scrub, scrub_and_verify, verify_zero, verify_zero_async

__all__ = [
    "GcmDecryptor",
    "SegmentSpec",
    "blake3_digest",
    "blake3_digest_device",
    "decrypt_segments",
    "decrypt_segments_or_scrub",
    "first_bad_segment",
    "scrub",
    "scrub_and_verify",
    "segment_nonce",
    "verify_zero",
    "verify_zero_async",
]
