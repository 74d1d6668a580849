"""The transport's limits are what the pipeline accepts, derived from the protocol, not guessed."""

from __future__ import annotations

import pytest

from gtbus.errors import RejectedMessage
from gtbus.gpu.channel import MAX_SEGMENT_SIZE, TAG_SIZE
from gtbus.messages.envelope import DEFAULT_LIMITS, MAGIC, MAX_BLOB, MAX_BLOBS, SIG_LEN, packb
from gtbus.messages.registry import REGISTRY, body_from_wire
from gtbus.messages.types import ECHO_MAX_NOTE, ECHO_MAX_PAYLOAD, Echo, EchoReply
from gtbus.transport import SocketTuning


def test_the_largest_blob_is_one_segment_with_its_tag() -> None:
    assert MAX_BLOB == MAX_SEGMENT_SIZE + TAG_SIZE
    assert MAX_BLOBS == max(spec.max_blobs for spec in REGISTRY.values())
    assert DEFAULT_LIMITS.max_frames == 4 + MAX_BLOBS


def test_message_and_frame_limits_add_up_and_the_transport_uses_them() -> None:
    lim = DEFAULT_LIMITS
    assert lim.max_total == len(MAGIC) + lim.max_header + lim.max_body + SIG_LEN + MAX_BLOBS * lim.max_blob
    assert lim.largest_frame == max(lim.max_blob, lim.max_body, lim.max_header)
    tuning = SocketTuning()
    assert (tuning.max_frame_bytes, tuning.max_frames, tuning.max_message_bytes) == (
        lim.largest_frame,
        lim.max_frames,
        lim.max_total,
    )


@pytest.mark.parametrize("cls", [Echo, EchoReply])
def test_echo_payloads_are_bounded_when_built_and_when_decoded(cls: type) -> None:
    cls(bytes(ECHO_MAX_PAYLOAD), "n" * ECHO_MAX_NOTE)
    with pytest.raises(ValueError):
        cls(bytes(ECHO_MAX_PAYLOAD + 1), "")
    with pytest.raises(ValueError):
        cls(b"", "n" * (ECHO_MAX_NOTE + 1))
    spec = next(s for s in REGISTRY.values() if s.cls is cls)
    with pytest.raises(RejectedMessage) as info:
        body_from_wire(spec, {"payload": bytes(1 << 20), "note": ""})
    assert info.value.reason == "bad-body"
    assert len(packb({"payload": bytes(ECHO_MAX_PAYLOAD), "note": ""})) < DEFAULT_LIMITS.max_body
