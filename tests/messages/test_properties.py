"""Property: no input makes the pipeline raise anything but RejectedMessage, and a refusal changes nothing.

Inputs are arbitrary frame lists, arbitrary msgpack headers, and mutations of
really signed frames. A mutated message may only be accepted if it is byte for
byte the original.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gtbus.errors import RejectedMessage
from gtbus.messages import BROADCAST, MessageSigner, ReceivePipeline, ReplayGuard
from gtbus.messages.envelope import MAGIC, packb, parse_header
from gtbus.messages.types import Echo, ShipSegment, Shutdown, TokenGrant
from msgkit import FakeClock, make_deployment

DEP = make_deployment()
CLOCK = FakeClock()  # never moves, so the signed frames below stay fresh for every example


def _valid_messages() -> list[tuple[str, list[bytes]]]:
    """(receiver, frames) of a few real messages, covering blobs, broadcast and a fenced type."""
    orch, h1 = MessageSigner(DEP.orch, CLOCK), MessageSigner(DEP.h1, CLOCK)
    grant = TokenGrant("tok", "run", "h1", 1, "travel", 1e9, b"\x00" * 72, {"k": [1, b"2", None]})
    out = [
        ("h1", orch.sign(grant, "h1", epoch=3)[1]),
        ("h1", orch.sign(Shutdown("bye"), BROADCAST)[1]),
        ("orch", h1.sign(ShipSegment("tok", 0, 1), "orch", epoch=3, blobs=[bytes(range(256)) * 4])[1]),
        ("orch", h1.sign(Echo(b"\x00\xff", "n"), "orch", parent=b"p" * 16)[1]),
    ]
    return [(me, [bytes(f) for f in frames]) for me, frames in out]


VALID = _valid_messages()


def _fresh(me: str, *, seeded: bool) -> ReceivePipeline:
    guard = ReplayGuard(CLOCK)
    if seeded:  # some state that a refusal must not touch
        guard.raise_fence(2)
        s = MessageSigner(DEP.agent, CLOCK)
        ReceivePipeline(me, DEP.roster, guard).accept(s.sign(Echo(b"", ""), me)[1])
    return ReceivePipeline(me, DEP.roster, guard)


def _check(me: str, frames: list[bytes], original: list[bytes] | None = None) -> None:
    pipe = _fresh(me, seeded=True)
    marks, fence = pipe.guard.marks(), pipe.guard.fence
    try:
        pipe.accept(frames)
    except RejectedMessage as exc:
        assert exc.reason and pipe.rejected[exc.reason] == 1 and pipe.accepted == 0
        assert pipe.guard.marks() == marks
        assert pipe.guard.fence == fence
        return
    # Accepted: only an unmodified original can get here.
    assert original is not None and frames == original


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

frame = st.binary(max_size=300)


@SETTINGS
@given(frames=st.lists(frame, max_size=10), me=st.sampled_from(["h1", "orch"]))
def test_arbitrary_frames(frames, me):
    _check(me, frames)


@SETTINGS
@given(
    rest=st.lists(frame, min_size=3, max_size=7),
    me=st.sampled_from(["h1", "orch"]),
)
def test_arbitrary_frames_behind_the_right_magic(rest, me):
    _check(me, [MAGIC, *rest])


msgpack_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
msgpack_value = st.recursive(
    msgpack_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


@SETTINGS
@given(
    header=st.one_of(msgpack_value.map(packb), st.binary(max_size=64)),
    body=st.one_of(msgpack_value.map(packb), st.binary(max_size=64)),
    sig=st.binary(min_size=64, max_size=64),
    blobs=st.lists(st.binary(max_size=16), max_size=4),
    me=st.sampled_from(["h1", "orch"]),
)
def test_arbitrary_msgpack_in_well_shaped_frames(header, body, sig, blobs, me):
    """Right magic and a 64-byte signature frame, so every input reaches the header parser."""
    _check(me, [MAGIC, header, body, sig, *blobs])


@SETTINGS
@given(
    which=st.integers(0, len(VALID) - 1),
    changes=st.dictionaries(
        st.sampled_from(["v", "id", "type", "sender", "recipient", "session", "seq", "ts", "exp", "epoch", "parent", "x"]),
        msgpack_value,
        min_size=1,
        max_size=3,
    ),
    drop=st.sets(st.sampled_from(["v", "id", "type", "sender", "seq", "parent"]), max_size=2),
)
def test_structured_header_changes(which, changes, drop):
    me, original = VALID[which]
    header = parse_header(original[1]).to_wire()
    header.update(changes)
    for k in drop:
        header.pop(k, None)
    frames = [original[0], packb(header), *original[2:]]
    _check(me, frames, original)


@st.composite
def mutated(draw):
    which = draw(st.integers(0, len(VALID) - 1))
    me, original = VALID[which]
    frames = list(original)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "drop", "dup", "swap", "replace", "insert"]))
        if not frames:
            frames = [b""]
        i = draw(st.integers(0, len(frames) - 1))
        f = bytearray(frames[i])
        if op == "flip" and f:
            pos = draw(st.integers(0, len(f) * 8 - 1))
            f[pos // 8] ^= 1 << (pos % 8)
            frames[i] = bytes(f)
        elif op == "set" and f:
            f[draw(st.integers(0, len(f) - 1))] = draw(st.integers(0, 255))
            frames[i] = bytes(f)
        elif op == "truncate":
            frames[i] = bytes(f[: draw(st.integers(0, len(f)))])
        elif op == "extend":
            frames[i] = bytes(f) + draw(st.binary(min_size=1, max_size=8))
        elif op == "drop":
            del frames[i]
        elif op == "dup":
            frames.insert(i, bytes(f))
        elif op == "swap":
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
        elif op == "replace":
            frames[i] = draw(st.binary(max_size=100))
        elif op == "insert":
            frames.insert(i, draw(st.binary(max_size=50)))
    return me, frames, original


@SETTINGS
@given(case=mutated())
def test_mutations_of_signed_frames(case):
    me, frames, original = case
    _check(me, frames, original)


def test_the_valid_messages_are_accepted():
    """Guards the properties above against passing because everything is refused anyway."""
    for me, frames in VALID:
        pipe = _fresh(me, seeded=True)
        assert pipe.accept(frames)
