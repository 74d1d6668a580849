"""Property: random multipart messages over a real CURVE socket never crash the node or move its guard.

The bus runs in a loop thread (hypothesis calls the property synchronously);
every example is sent raw over h1's authenticated connection and waited on
until the orchestrator has judged it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus_helpers import LiveBus, LoopThread, verdicts
from gtbus.messages.envelope import MAGIC, SIG_LEN, packb
from gtbus.messages.registry import REGISTRY
from gtbus.messages.types import Echo, ShipSegment
from gtbus.replay.verify import verify_log

frame = st.binary(max_size=300)
raw_multipart = st.lists(frame, min_size=1, max_size=10)

header_value = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=20),
    st.binary(max_size=20), st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3),
)
header_map = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 1, 0, 2]),
        "id": st.binary(min_size=16, max_size=16),
        "type": st.sampled_from([*REGISTRY, "nope", "__class__"]),
        "sender": st.sampled_from(["h1", "h2", "orch", "eve", ""]),
        "recipient": st.sampled_from(["orch", "*", "h2"]),
        "session": st.binary(min_size=16, max_size=16),
        "seq": st.integers(0, 2**63),
        "ts": st.floats(allow_nan=True) | st.just(time.time()),
        "exp": st.floats(allow_nan=True) | st.just(time.time() + 30),
        "epoch": st.integers(0, 2**63),
        "parent": st.none() | st.binary(max_size=16),
    },
    optional={"extra": header_value},
)
structured = st.tuples(
    header_map, st.binary(max_size=200), st.binary(min_size=SIG_LEN, max_size=SIG_LEN), st.lists(frame, max_size=3)
).map(lambda t: [MAGIC, packb(t[0]), t[1], t[2], *t[3]])


def test_random_multiparts_never_crash_the_node(tmp_path: Path) -> None:
    loop = LoopThread()
    bus = LiveBus(tmp_path)
    loop.call(bus.start())
    try:
        o = bus.o
        marks, fence = o.guard.marks(), o.guard.fence
        sent = 0

        def valid_frames(blob: bool) -> list[bytes]:
            # Signed by h1's runtime signer (its next seq), then mutated below: never sent as is.
            msg: Any = ShipSegment("tok", 0, 1) if blob else Echo(b"payload", "note")
            _, frames = bus.h().signer.sign(msg, "orch", blobs=[b"blob-bytes" * 8] if blob else [])
            return [bytes(f) for f in frames]

        @st.composite
        def mutated(draw: st.DrawFn) -> list[bytes]:
            frames = valid_frames(draw(st.booleans()))
            how = draw(st.sampled_from(["byte", "drop", "add", "swap"]))
            # Positions are drawn independently of the frames' lengths, which grow with the
            # signer's sequence number (hypothesis wants the same draws for the same choices).
            if how == "byte":
                i = draw(st.integers(0, 4)) % len(frames)
                f = bytearray(frames[i])
                pos = draw(st.integers(0, 1 << 16)) % len(f)
                f[pos] ^= draw(st.integers(1, 255))
                frames[i] = bytes(f)
            elif how == "drop":
                del frames[draw(st.integers(0, 4)) % len(frames)]
            elif how == "add":
                frames.insert(1 + draw(st.integers(0, 4)) % len(frames), draw(frame))
            else:
                i, j = draw(st.sampled_from([(0, 1), (1, 2), (2, 3), (1, 3)]))
                if frames[i] == frames[j]:
                    frames[i] += b"\x00"
                frames[i], frames[j] = frames[j], frames[i]
            return frames

        @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(st.one_of(raw_multipart, structured, mutated()))
        def prop(frames: list[bytes]) -> None:
            nonlocal sent
            verdict = loop.call(bus.inject(frames), timeout=10)
            sent += 1
            assert verdict.startswith(("rejected:", "dropped:transport-oversize")), verdict
            assert o.guard.marks() == marks
            assert o.guard.fence == fence
            assert o.pipeline.accepted == 0
            assert all(not t.done() for t in o._tasks), "the receive loop died"

        prop()
        dropped = bus.oversize()  # more frames than any message has: drained by the transport, never judged
        assert sum(o.rejected.values()) + dropped == sent
        loop.call(bus.echo())
        assert o.pipeline.accepted == 1
        report = verify_log(bus.orch_log)
        assert report.ok, report.error
        assert report.rejected_records == sent - dropped
        assert verdicts(bus.orch_log)[-2:] == ["accepted", "sent"]
    finally:
        loop.call(bus.close())
        loop.stop()
