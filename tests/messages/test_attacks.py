"""Attacks at the receive pipeline: each is refused with the right reason, counted, and changes nothing.

After every refusal the pipeline must still accept the next legitimate message.
Real keys, real signatures, a fake clock.
"""

from __future__ import annotations

import os
import random

import pytest

from gtbus.errors import RejectedMessage
from gtbus.messages import BROADCAST, DEFAULT_LIMITS, Limits, MessageSigner, ReceivePipeline, ReplayGuard
from gtbus.messages.envelope import MAGIC, packb, signing_input
from gtbus.messages.types import Echo, Heartbeat, ShipSegment, Shutdown, TokenAck, TokenGrant
from msgkit import FakeClock, craft, resign


def refuse(pipe: ReceivePipeline, frames, reason: str, *, authenticated_as: str | None = None, state_may_change=False):
    """Assert ``frames`` is refused with ``reason``, counted once, and (by default) moves no mark or fence."""
    marks, fence = pipe.guard.marks(), pipe.guard.fence
    before = pipe.rejected[reason]
    accepted = pipe.accepted
    with pytest.raises(RejectedMessage) as ei:
        pipe.accept(frames, authenticated_as=authenticated_as)
    assert ei.value.reason == reason, str(ei.value)
    assert pipe.rejected[reason] == before + 1
    assert pipe.accepted == accepted
    assert "\n" not in str(ei.value)
    if not state_may_change:
        assert pipe.guard.marks() == marks
        assert pipe.guard.fence == fence
    return ei.value


def grant(holder: str = "h1") -> TokenGrant:
    return TokenGrant(
        token_id="tok",
        run_id="run",
        holder=holder,
        chunk_index=3,
        mode="travel",
        lease_deadline=1e9,
        sealed_params=b"\x01" * 72,
        report={"code": b"\x02" * 32},
    )


def echo(n: int = 0) -> Echo:
    return Echo(payload=n.to_bytes(4, "big"), note=f"n{n}")


@pytest.fixture
def orch_to_h1(dep, clock, make_pipeline):
    """(signer of orch, pipeline of h1)."""
    return MessageSigner(dep.orch, clock), make_pipeline("h1")


def still_works(pipe: ReceivePipeline, signer: MessageSigner, msg=None, to: str | None = None):
    msg = echo(99) if msg is None else msg
    got = pipe.accept(signer.sign(msg, to or pipe.me)[1], authenticated_as=signer.identity.name)
    assert got.message == msg
    return got


# -- replay -----------------------------------------------------------------------------------------


def test_replay_of_an_accepted_message(orch_to_h1):
    signer, pipe = orch_to_h1
    _, frames = signer.sign(echo(1), "h1")
    pipe.accept(frames)
    refuse(pipe, frames, "replay")
    refuse(pipe, list(frames), "replay")  # a copy is the same message
    still_works(pipe, signer)
    refuse(pipe, frames, "replay")


def test_replay_after_restart_with_the_same_journal(dep, clock, journal):
    signer = MessageSigner(dep.orch, clock)
    g1 = ReplayGuard(clock, journal=journal)
    p1 = ReceivePipeline("h1", dep.roster, g1)
    old = [signer.sign(echo(i), "h1")[1] for i in range(3)]
    for frames in old:
        p1.accept(frames)
    g1.raise_fence(4)
    g1.close()

    # The receiver restarts: new guard on the same journal, new pipeline, still inside the ttl.
    clock.advance(1)
    g2 = ReplayGuard(clock, journal=journal)
    p2 = ReceivePipeline("h1", dep.roster, g2)
    try:
        assert g2.marks() == {("orch", "h1"): (signer.session, 3)}
        assert g2.fence == 4
        for frames in old:
            refuse(p2, frames, "replay")
        still_works(p2, signer)
        # Without the journal the same frames would have been accepted: the journal is what refuses them.
        fresh = ReceivePipeline("h1", dep.roster, ReplayGuard(clock))
        fresh.accept(old[0])
    finally:
        g2.close()


def _junk_frames(rng: random.Random, dep, clock, valid):
    kind = rng.randrange(8)
    if kind == 0:  # random bytes, random frame count
        return [rng.randbytes(rng.randrange(0, 80)) for _ in range(rng.randrange(0, 10))]
    if kind == 1:  # right magic, random header/body/signature
        return [MAGIC, rng.randbytes(rng.randrange(0, 200)), rng.randbytes(rng.randrange(0, 50)), rng.randbytes(64)]
    if kind == 2:  # truncated msgpack header
        return [MAGIC, valid[1][: rng.randrange(0, len(valid[1]))], valid[2], valid[3]]
    if kind == 3:  # garbled msgpack header (bytes changed)
        h = bytearray(valid[1])
        for _ in range(rng.randrange(1, 6)):
            h[rng.randrange(len(h))] ^= rng.randrange(1, 256)  # always a change
        return [MAGIC, bytes(h), valid[2], valid[3]]
    if kind == 4:  # valid header and body, random signature
        return [*valid[:3], rng.randbytes(64)]
    if kind == 5:  # forged: well-formed, signed by a key that is not the sender's
        return craft(dep.outsider, "echo", {"payload": b"", "note": ""}, "h1", now=clock.time(),
                     sender="orch", seq=rng.randrange(1, 1 << 40))
    if kind == 6:  # garbled body under the real signature
        return [*valid[:2], rng.randbytes(len(valid[2])), valid[3]]
    return [*valid, rng.randbytes(rng.randrange(1, 100))]  # an extra blob


def test_replay_after_a_flood_of_junk(dep, clock, orch_to_h1):
    signer, pipe = orch_to_h1
    accepted = []
    for i in range(3):
        frames = signer.sign(echo(i), "h1")[1]
        pipe.accept(frames)
        accepted.append(frames)
    marks = pipe.guard.marks()
    rng = random.Random(1234)
    template = signer.sign(echo(1000), "h1")[1]  # signed but never delivered
    for _ in range(10_000):
        junk = _junk_frames(rng, dep, clock, template)
        with pytest.raises(RejectedMessage):
            pipe.accept(junk)
    assert pipe.guard.marks() == marks
    assert sum(pipe.rejected.values()) == 10_000
    assert pipe.accepted == 3
    assert {"bad-signature", "malformed", "bad-msgpack", "bad-magic"} <= set(pipe.rejected)
    for frames in accepted:
        refuse(pipe, frames, "replay")
    still_works(pipe, signer)


# -- forgery and tampering --------------------------------------------------------------------------


def test_forged_signature_by_another_key(dep, clock, orch_to_h1):
    signer, pipe = orch_to_h1
    # Signed by a roster member (h2) but claiming to be orch, and by an outsider claiming to be orch.
    for forger in (dep.h2, dep.outsider):
        frames = craft(forger, "shutdown", {"reason": "x"}, "h1", now=clock.time(), sender="orch")
        refuse(pipe, frames, "bad-signature")
    # A genuine signature moved onto other content.
    _, a = signer.sign(Shutdown("a"), "h1")
    _, b = signer.sign(Shutdown("b"), "h1")
    refuse(pipe, [a[0], a[1], b[2], a[3]], "bad-signature")
    refuse(pipe, [a[0], b[1], a[2], a[3]], "bad-signature")
    # A signature over header||body without the domain tag and length prefixes.
    plain = dep.orch.sign(b[1] + b[2])
    refuse(pipe, [*b[:3], plain], "bad-signature")
    pipe.accept(b)
    still_works(pipe, signer)


def _flip(frames, i, bit):
    f = bytearray(frames[i])
    f[bit // 8] ^= 1 << (bit % 8)
    out = list(frames)
    out[i] = bytes(f)
    return out


def test_bit_flip_anywhere_is_never_accepted(dep, clock, make_pipeline):
    signer = MessageSigner(dep.h1, clock)
    pipe = make_pipeline("orch")
    pipe.guard.raise_fence(2)
    blob = os.urandom(4096 + 16)
    _, frames = signer.sign(ShipSegment("tok", 0, 1), "orch", epoch=2, blobs=[blob])
    assert len(frames) == 5
    rng = random.Random(7)
    marks = pipe.guard.marks()
    tried = 0
    for i, frame in enumerate(frames):
        nbits = len(frame) * 8
        # Every bit of magic, header, body and signature; a sample of the blob (first, last, random).
        bits = range(nbits) if i < 4 else sorted({0, 7, nbits - 1, *rng.sample(range(nbits), 400)})
        for bit in bits:
            with pytest.raises(RejectedMessage):
                pipe.accept(_flip(frames, i, bit))
            tried += 1
    assert tried > 2000
    assert pipe.accepted == 0 and pipe.guard.marks() == marks
    # Truncation, dropping, duplicating and reordering frames are refused too.
    for bad in (
        frames[:4],
        frames[:3],
        [*frames, blob],
        [frames[0], frames[2], frames[1], *frames[3:]],
        [*frames[:4], blob[:-1]],
        [*frames[:4], blob + b"\x00"],
        [*frames[:4], b""],
        [frames[0][:-1], *frames[1:]],
        [frames[0], frames[1][:-1], *frames[2:]],
        [frames[0], frames[1], frames[2][:-1], *frames[3:]],
        [*frames[:3], frames[3][:-1], frames[4]],
    ):
        with pytest.raises(RejectedMessage):
            pipe.accept(bad)
    assert pipe.accepted == 0 and pipe.guard.marks() == marks
    assert pipe.accept(frames).blobs == [blob]


def test_wrong_recipient(dep, clock, orch_to_h1):
    signer, pipe = orch_to_h1
    refuse(pipe, signer.sign(Shutdown("x"), "h2")[1], "wrong-recipient")
    refuse(pipe, signer.sign(TokenGrant(**{**grant().__dict__, "holder": "h2"}), "h2")[1], "wrong-recipient")
    # Broadcast types may come to "*"; others may not (crafted, since the signer refuses).
    assert pipe.accept(signer.sign(Shutdown("all"), BROADCAST)[1]).message == Shutdown("all")
    bad = craft(dep.orch, "token.revoke", {"token_id": "t", "reason": "r"}, BROADCAST, now=clock.time())
    refuse(pipe, bad, "wrong-recipient")
    still_works(pipe, signer)


def test_wrong_role_holder_sends_a_grant(dep, clock, make_pipeline):
    pipe = make_pipeline("h2")
    with pytest.raises(ValueError):
        MessageSigner(dep.h1, clock).sign(grant("h2"), "h2")
    from gtbus.messages.registry import body_to_wire

    frames = craft(dep.h1, "token.grant", body_to_wire(grant("h2")), "h2", now=clock.time())
    refuse(pipe, frames, "wrong-role", authenticated_as="h1")
    # An observer may not register; an agent may.
    obs = craft(dep.obs, "register", {"manifest": {}, "software": "x"}, "h2", now=clock.time())
    refuse(pipe, obs, "wrong-role")
    agent = craft(dep.agent, "register", {"manifest": {}, "software": "x"}, "h2", now=clock.time())
    pipe.accept(agent)
    still_works(pipe, MessageSigner(dep.orch, clock), grant("h2"))


def test_unknown_sender_and_unknown_type(dep, clock, orch_to_h1):
    signer, pipe = orch_to_h1
    refuse(pipe, craft(dep.outsider, "echo", {"payload": b"", "note": ""}, "h1", now=clock.time()), "unknown-sender")
    refuse(pipe, craft(dep.orch, "exec", {"cmd": "rm -rf /"}, "h1", now=clock.time()), "unknown-type")
    refuse(pipe, craft(dep.orch, "__class__", {}, "h1", now=clock.time()), "unknown-type")
    still_works(pipe, signer)


def test_authenticated_as_mismatch(dep, clock, make_pipeline):
    pipe = make_pipeline("orch")
    s1 = MessageSigner(dep.h1, clock)
    _, frames = s1.sign(TokenAck("tok"), "orch")
    # Signed as h1, arriving over h2's CURVE-authenticated connection.
    refuse(pipe, frames, "wrong-peer", authenticated_as="h2")
    refuse(pipe, frames, "wrong-peer", authenticated_as="eve")
    assert pipe.accept(frames, authenticated_as="h1").message == TokenAck("tok")
    still_works(pipe, s1)


# -- size limits and decode bombs -------------------------------------------------------------------


def test_oversize(dep, clock, orch_to_h1):
    signer, pipe = orch_to_h1
    _, f = signer.sign(echo(), "h1")
    lim = DEFAULT_LIMITS
    refuse(pipe, [*f, *([b"x"] * (lim.max_frames - 3))], "oversize")
    refuse(pipe, [f[0], b"\x00" * (lim.max_header + 1), f[2], f[3]], "oversize")
    refuse(pipe, [f[0], f[1], b"\x00" * (lim.max_body + 1), f[3]], "oversize")
    refuse(pipe, [*f, b"\x00" * (lim.max_blob + 1)], "oversize")
    # Size checks come first: an oversize frame is refused before the magic is even looked at.
    refuse(pipe, [b"junk", b"\x00" * (lim.max_header + 1), b"", b""], "oversize")
    refuse(pipe, [], "malformed")
    refuse(pipe, f[:3], "malformed")
    # Total: unreachable with the default per-frame limits, so check it with a smaller one.
    small = ReceivePipeline("h1", pipe.roster, pipe.guard, Limits(max_total=2000))
    blob = b"\x00" * 1990
    _, seg = MessageSigner(dep.h1, clock).sign(ShipSegment("t", 0, 1), "orch", blobs=[blob])
    refuse(small, seg, "oversize")
    pipe.accept(f)
    still_works(pipe, signer)


def test_too_many_blobs_for_the_type(dep, clock, orch_to_h1):
    signer, pipe = orch_to_h1
    frames = craft(dep.orch, "shutdown", {"reason": "x"}, "h1", now=clock.time(), blobs=[b"bulk"])
    refuse(pipe, frames, "malformed")
    still_works(pipe, signer)


BOMBS = {
    "deep-nesting": b"\x91" * 100_000,
    "huge-array32": b"\xdd\xff\xff\xff\xff",
    "huge-array16": b"\xdc\xff\xff" + b"\xc0" * 10,
    "huge-map32": b"\xdf\xff\xff\xff\xff",
    "huge-str32": b"\xdb\xff\xff\xff\xff" + b"a" * 10,
    "huge-bin32": b"\xc6\xff\xff\xff\xff" + b"a" * 10,
    "huge-ext32": b"\xc9\xff\xff\xff\xff\x05",
    "map-in-map-of-huge-str": b"\x81\xa1k\xdb\x7f\xff\xff\xff",
    "zero-length-ext": b"\x81\xa1k\xc7\x00\x05",
    "int-map-key": b"\x81\x01\x01",
}
BOMB_REASON_IN_BODY = {"deep-nesting": "decode-bomb"}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_decode_bomb_in_header(name, orch_to_h1):
    signer, pipe = orch_to_h1
    bomb = BOMBS[name]
    _, f = signer.sign(echo(), "h1")
    # The deep-nesting bomb is over the header size limit, so it never reaches the decoder.
    expected = "oversize" if len(bomb) > DEFAULT_LIMITS.max_header else "bad-msgpack"
    refuse(pipe, [f[0], bomb, f[2], f[3]], expected)
    pipe.accept(f)
    still_works(pipe, signer)


def test_decode_bomb_in_header_reaches_the_decoder_with_a_larger_header_limit(dep, orch_to_h1):
    signer, pipe = orch_to_h1
    big = ReceivePipeline("h1", dep.roster, pipe.guard, Limits(max_header=200_000))
    _, f = signer.sign(echo(), "h1")
    refuse(big, [f[0], BOMBS["deep-nesting"], f[2], f[3]], "decode-bomb")
    # Nesting that fits in 1024 bytes decodes (or runs out of input) without harm.
    refuse(pipe, [f[0], b"\x91" * 1024, f[2], f[3]], "bad-msgpack")
    refuse(pipe, [f[0], b"\x91" * 1000 + b"\xc0", f[2], f[3]], "bad-header")
    big.accept(f)


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_decode_bomb_in_a_correctly_signed_body(name, dep, orch_to_h1):
    signer, pipe = orch_to_h1
    _, f = signer.sign(echo(), "h1")
    bad = resign(dep.orch, f, body_bytes=BOMBS[name])
    # The signature is valid, so the sequence number is spent (docs/protocol.md section 6).
    refuse(pipe, bad, BOMB_REASON_IN_BODY.get(name, "bad-msgpack"), state_may_change=True)
    refuse(pipe, f, "replay")
    still_works(pipe, signer)


def test_nested_header_values_are_refused_as_bad_header(dep, clock, orch_to_h1):
    signer, pipe = orch_to_h1
    _, f = signer.sign(echo(), "h1")
    from gtbus.messages.envelope import parse_header

    h = parse_header(f[1]).to_wire()
    for key, value in [("type", ["echo"]), ("seq", [[[[1]]]]), ("ts", {"a": 1.0}), ("session", "x" * 16),
                       ("seq", True), ("epoch", -1), ("id", b"\x00" * 15), ("ts", float("nan")),
                       ("exp", float("inf")), ("parent", 0)]:
        hb = packb({**h, key: value})
        frames = [f[0], hb, f[2], dep.orch.sign(signing_input(hb, f[2], []))]
        refuse(pipe, frames, "bad-header")
    for hdr in ({k: v for k, v in h.items() if k != "parent"}, {**h, "x": 1}, {**h, b"v": 1}, [h], "h"):
        refuse(pipe, [f[0], packb(hdr), f[2], f[3]], "bad-header")
    refuse(pipe, [f[0], packb({**h, "v": 2}), f[2], f[3]], "bad-version")
    refuse(pipe, [b"GTB\x02", *f[1:]], "bad-magic")
    refuse(pipe, [*f[:3], f[3] + b"\x00"], "malformed")
    pipe.accept(f)


# -- freshness: expiry, skew, epochs, sessions, order -----------------------------------------------


def test_expired_and_future_messages(dep, clock, orch_to_h1):
    signer, pipe = orch_to_h1
    _, late = signer.sign(echo(1), "h1", ttl=10)
    clock.advance(10.5)
    refuse(pipe, late, "expired")

    ahead = FakeClock(clock.time() + pipe.guard.max_skew + 1)
    early = MessageSigner(dep.h2, ahead)  # another sender: its later session must not shadow orch's
    refuse(pipe, early.sign(echo(2), "h1")[1], "clock-skew")
    # Within the skew is fine.
    ahead.now = clock.time() + pipe.guard.max_skew - 1
    pipe.accept(early.sign(echo(3), "h1")[1])

    refuse(pipe, signer.sign(echo(4), "h1", ttl=pipe.guard.max_ttl + 1)[1], "bad-expiry")
    still_works(pipe, signer)


def test_nan_expiry_never_gets_past_the_header(dep, clock, orch_to_h1):
    """exp=NaN compared false both ways in the guard, so it never expired (fixed in parse_header)."""
    _, pipe = orch_to_h1
    forever = MessageSigner(dep.orch, clock, ttl=float("nan"))
    _, frames = forever.sign(echo(), "h1")
    clock.advance(86400 * 30)
    refuse(pipe, frames, "bad-header")


def test_stale_epoch_after_fence(dep, clock, make_pipeline):
    pipe = make_pipeline("orch")
    holder = MessageSigner(dep.h1, clock)
    _, paused = holder.sign(TokenReturnLike(), "orch", epoch=4)  # signed at epoch 4, delivered late
    pipe.guard.raise_fence(5)
    refuse(pipe, paused, "stale-epoch")
    pipe.guard.raise_fence(3)  # never lowers
    assert pipe.guard.fence == 5
    refuse(pipe, holder.sign(TokenAck("tok"), "orch", epoch=4)[1], "stale-epoch")
    assert pipe.accept(holder.sign(TokenAck("tok"), "orch", epoch=5)[1]).header.epoch == 5
    assert pipe.accept(holder.sign(TokenAck("tok"), "orch", epoch=6)[1]).header.epoch == 6
    # Non-fenced types ignore the epoch.
    assert pipe.accept(holder.sign(Heartbeat("idle", 1.0), "orch", epoch=0)[1])


def TokenReturnLike():
    from gtbus.messages.types import TokenReturn

    return TokenReturn(token_id="tok", chunk_index=1, segments=4, nbytes=1 << 20, ciphertext_digest=b"\x03" * 32, chunk_commitment=b"\x04" * 32)


def test_old_session_after_a_newer_one(dep, clock, orch_to_h1):
    _, pipe = orch_to_h1
    old = MessageSigner(dep.orch, clock)
    old_frames = [old.sign(echo(i), "h1")[1] for i in range(5)]
    pipe.accept(old_frames[0])
    clock.advance(1)
    new = MessageSigner(dep.orch, clock)  # the sender restarted: later session, seq starts again at 1
    assert new.session > old.session
    assert pipe.accept(new.sign(echo(10), "h1")[1]).header.seq == 1
    for frames in old_frames[1:]:  # never seen, higher seq, but from the older session
        err = refuse(pipe, frames, "replay")
        assert "old session" in err.detail
    still_works(pipe, new)


def test_out_of_order_and_duplicate_within_a_session(orch_to_h1):
    signer, pipe = orch_to_h1
    f1, f2, f3, f4, f5 = (signer.sign(echo(i), "h1")[1] for i in range(5))
    pipe.accept(f2)
    refuse(pipe, f1, "replay")  # went back
    refuse(pipe, f2, "replay")  # duplicate
    pipe.accept(f4)  # a gap is fine
    refuse(pipe, f3, "replay")
    pipe.accept(f5)
    still_works(pipe, signer)


def test_streams_are_independent(dep, clock, make_pipeline):
    """A broadcast and a direct message have separate sequences; one does not make the other a replay."""
    pipe = make_pipeline("h1")
    signer = MessageSigner(dep.orch, clock)
    direct = [signer.sign(echo(i), "h1")[1] for i in range(2)]
    bcast = [signer.sign(Shutdown(str(i)), BROADCAST)[1] for i in range(2)]
    pipe.accept(direct[1])
    pipe.accept(bcast[0])
    pipe.accept(bcast[1])
    refuse(pipe, direct[0], "replay")
    assert pipe.guard.marks() == {("orch", "h1"): (signer.session, 2), ("orch", "*"): (signer.session, 2)}
