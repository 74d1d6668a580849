"""The device layer: where the model lives and where a hop's data lands.

Layering, bottom up:

- ``channel``: per-hop AEAD segments (params, associated data, staging layout,
  the holder's sealer and the device's CPU opener).
- ``sealing``: channel params sealed to one holder's X25519 key.
- ``measure``: BLAKE3 measurements of model and code.
- ``attestation``: signed measurement reports and the verifier interface.
- ``device``: the :class:`Device` protocol every backend implements.
- ``host``: the numpy + sealed memfd backend (runs everywhere; staging passed over a Unix socket).

The cupy backend is not imported here, so ``import gtbus.gpu`` never needs CUDA.
"""

from gtbus.gpu.attestation import (
    AttestationError,
    EmulatedVerifier,
    MeasurementReport,
    PlatformSigner,
    SignedReport,
    Verifier,
    channel_key_commitment,
)
from gtbus.gpu.channel import (
    AES_256_GCM,
    CHACHA20_POLY1305,
    ChannelParams,
    SealSummary,
    SegmentCipher,
    SegmentContext,
    SegmentOpener,
    SegmentSealer,
    ciphertext_digest,
    segment_count,
    staging_size,
)
from gtbus.gpu.device import BufferHandle, Device, DeviceBuffer, HolderStaging, StagingWriter
from gtbus.gpu.host import HostBuffer, HostDevice, HostStaging, HostStagingWriter
from gtbus.gpu.measure import measure_code, measure_model
from gtbus.gpu.sealing import open_params, seal_params

__all__ = [
    "AES_256_GCM",
    "CHACHA20_POLY1305",
    "AttestationError",
    "BufferHandle",
    "ChannelParams",
    "Device",
    "DeviceBuffer",
    "EmulatedVerifier",
    "HolderStaging",
    "HostBuffer",
    "HostDevice",
    "HostStaging",
    "HostStagingWriter",
    "MeasurementReport",
    "PlatformSigner",
    "SealSummary",
    "SegmentCipher",
    "SegmentContext",
    "SegmentOpener",
    "SegmentSealer",
    "SignedReport",
    "StagingWriter",
    "Verifier",
    "channel_key_commitment",
    "ciphertext_digest",
    "measure_code",
    "measure_model",
    "open_params",
    "seal_params",
    "segment_count",
    "staging_size",
]
