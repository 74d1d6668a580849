"""Attacks against a live orchestrator node over real CurveZMQ sockets (DESIGN §4, §5, §11).

Every attack must be refused, counted (``runtime.rejected[reason]``), recorded
in the node's log with a ``rejected:<reason>`` verdict, must leave the replay
guard's marks and fence alone, and the node must keep serving: a legitimate
signed Echo round trip succeeds right after.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Sequence

from bus_helpers import LiveBus, craft, eventually, flip, junk, msg_records, run, signed_echo, verdicts
from gtbus.messages.envelope import MAGIC, packb
from gtbus.messages.identity import NodeIdentity, Role
from gtbus.messages.signer import MessageSigner
from gtbus.messages.types import Echo, ShipSegment, TokenReturn
from gtbus.nodes.runtime import NodeRuntime
from gtbus.nodes.wiring import client_transport
from gtbus.messages.envelope import blob_digest as refused_digest
from gtbus.replay.verify import verify_log
from gtbus.testing import FakeClock
from gtbus.transport.zmq import DEFAULT_MAX_FRAME_BYTES


async def refused(
    bus: LiveBus, frames: Sequence[bytes], reason: str, *, via: str = "h1", marks_move: bool = False, echo: bool = True
) -> None:
    """Send ``frames``; check refusal, counter, log record, untouched guard, and (``echo``) service after."""
    guard = bus.o.guard
    marks, fence = guard.marks(), guard.fence
    count = bus.o.rejected[reason]
    verdict = await bus.inject(frames, via)
    assert verdict == f"rejected:{reason}"
    assert bus.o.rejected[reason] == count + 1
    last = msg_records(bus.orch_log)[-1]
    assert last.data["verdict"] == f"rejected:{reason}"
    assert last.data["dir"] == "in"
    assert last.data["peer"] == via
    # Refused messages are kept as digest, sizes and reason: never whole (a peer picks their size).
    sent = [bytes(f) for f in frames]
    assert last.frames == [f[:1024] for f in sent[:2]]
    assert last.data["sizes"] == [len(f) for f in sent]
    assert last.data["digest"] == refused_digest(sent)
    if not marks_move:
        assert guard.marks() == marks
    assert guard.fence == fence
    if echo:
        await bus.echo(via)


def next_slot(rt: NodeRuntime, recipient: str) -> tuple[bytes, int]:
    """Take the next (session, seq) of ``rt``'s own signer for hand-made frames, so its later messages stay fresh."""
    header, _ = rt.signer.sign(Echo(b"", "slot"), recipient)
    return header.session, header.seq


# -- replay ------------------------------------------------------------------------------------


def test_replay_of_captured_message(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            await bus.echo()
            frames = signed_echo(bus)
            assert await bus.inject(frames) == "accepted"
            await eventually(lambda: bus.echoes == 2, what="echo handled")
            await refused(bus, frames, "replay")
            # Replayed over another member's connection it is refused too (before the guard).
            await refused(bus, frames, "wrong-peer", via="h2")
            assert bus.echoes == 4  # the two legit echoes after each refusal, nothing else

    run(scenario())


def test_replay_after_receiver_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            frames = signed_echo(bus)
            assert await bus.inject(frames) == "accepted"
            await bus.echo()
            marks = bus.o.guard.marks()
            await bus.close_orchestrator()
            await bus.start_orchestrator()  # same ports, same run_dir: the journal persists
            assert bus.o.guard.marks() == marks
            await bus.echo(tries=5, timeout=1.0)  # the holder reconnected
            await refused(bus, frames, "replay")
            assert verify_log(bus.orch_log).ok

    run(scenario())


def test_replay_after_junk_flood(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            frames = signed_echo(bus)
            assert await bus.inject(frames) == "accepted"
            marks = bus.o.guard.marks()
            rng = random.Random(7)
            n = bus.judged()
            flood, batch = 5000, 500
            # In batches under the DEALER's queue (sndhwm 1000), each waited out on the node's own count:
            # a slow machine makes the flood slower, never a send that times out on a full queue.
            for start in range(0, flood, batch):
                for i in range(start, start + batch):
                    await bus.h().transport.send(junk(rng, i))
                await eventually(lambda: bus.judged() == n + start + batch, 60, "the flood to be judged")
            assert bus.o.pipeline.accepted == 1
            assert bus.o.guard.marks() == marks
            await refused(bus, frames, "replay")
            dropped = bus.oversize()  # junk of more frames than any message: dropped by the transport
            assert dropped > 0
            recs = verdicts(bus.orch_log)
            assert sum(v.startswith("rejected:") for v in recs) == flood + 1 - dropped  # nothing else lost
            report = verify_log(bus.orch_log)
            assert report.ok, report.error
            assert report.rejected_records == flood + 1 - dropped

    run(scenario())


def test_reordered_duplicated_and_truncated(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            h1 = bus.h()
            first, second = signed_echo(bus, payload=b"1"), signed_echo(bus, payload=b"2")
            assert await bus.inject(second) == "accepted"
            await refused(bus, first, "replay")  # overtaken: going back is refused, gaps are not
            await refused(bus, second, "replay")  # duplicate
            _, seg = h1.signer.sign(ShipSegment("tok", 0, 1), "orch", blobs=[b"ciphertext" * 100])
            seg = [bytes(f) for f in seg]
            cut = [
                (seg[:4], "bad-signature"),  # blob dropped: the digest covers the count
                ([*seg[:4], seg[4][:-1]], "bad-signature"),  # blob cut short
                ([seg[0], seg[1], seg[2][:-1], seg[3]], "bad-signature"),  # body cut short
                ([seg[0], seg[1][:-1], seg[2], seg[3]], "bad-msgpack"),  # header cut short
                ([seg[0], seg[1], seg[2], seg[3][:-1]], "malformed"),  # signature cut short
                (seg[:3], "malformed"),  # signature frame missing
            ]
            for frames, reason in cut:  # no echo in between: it would take the next seq
                await refused(bus, frames, reason, echo=False)
            assert await bus.inject(seg) == "accepted"  # the original still passes: nothing was burnt
            await bus.echo()

    run(scenario())


def test_stale_epoch_from_a_paused_ex_holder(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            h1 = bus.h()
            _, late = h1.signer.sign(TokenReturn("tok", 0, 1, 32, bytes(32), bytes(32)), "orch", epoch=3)
            bus.o.guard.raise_fence(4)  # meanwhile the token moved on to epoch 4
            await refused(bus, [bytes(f) for f in late], "stale-epoch")
            _, current = h1.signer.sign(TokenReturn("tok", 1, 1, 32, bytes(32), bytes(32)), "orch", epoch=4)
            assert await bus.inject(current) == "accepted"

    run(scenario())


# -- forged and bit-flipped -------------------------------------------------------------------


def test_forged_signature(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            frames = signed_echo(bus)
            await refused(bus, [*frames[:3], bytes(64)], "bad-signature")
            # Signed with a key outside the deployment but claiming to be h1.
            mallory = NodeIdentity.generate("h1", Role.HOLDER)
            forged = craft(mallory, "echo", {"payload": b"x", "note": "n"}, "orch", now=time.time())
            await refused(bus, forged, "bad-signature")
            # h2's real signature on a message claiming sender h1, sent over h1's connection.
            h2_signed = craft(bus.dep.holders[1], "echo", {"payload": b"x", "note": "n"}, "orch", now=time.time(), sender="h1")
            await refused(bus, h2_signed, "bad-signature")

    run(scenario())


def test_bit_flip_in_every_frame(tmp_path: Path) -> None:
    """One flipped bit anywhere (magic, header, body, signature, blob) is refused; the original then passes."""

    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            h1 = bus.h()
            _, frames = h1.signer.sign(ShipSegment("tok", 0, 1), "orch", blobs=[bytes(range(256)) * 16])
            frames = [bytes(f) for f in frames]
            assert len(frames) == 5
            reasons: dict[int, set[str]] = {i: set() for i in range(5)}
            rng = random.Random(1)
            for i, f in enumerate(frames):
                positions = range(len(f)) if i in (0, 1) else sorted(rng.sample(range(len(f)), min(len(f), 24)))
                for pos in positions:
                    bad = flip(frames, i, pos, rng.randrange(8))
                    verdict = await bus.inject(bad)
                    assert verdict.startswith("rejected:"), (i, pos, verdict)
                    reasons[i].add(verdict.removeprefix("rejected:"))
                    assert msg_records(bus.orch_log)[-1].data["digest"] == refused_digest(bad)
            assert reasons[0] == {"bad-magic"}
            assert "bad-signature" in reasons[1]
            assert reasons[1] <= {"bad-signature", "bad-msgpack", "bad-header", "bad-version", "unknown-type", "unknown-sender", "wrong-role", "wrong-peer", "decode-bomb"}
            assert reasons[2] == reasons[3] == reasons[4] == {"bad-signature"}
            assert bus.o.guard.marks() == {}
            assert bus.o.pipeline.accepted == 0
            # Nothing was lost: the untouched message (same seq) is still fresh.
            assert await bus.inject(frames) == "accepted"
            await bus.echo()

    run(scenario())


# -- addressing, roles, peers -----------------------------------------------------------------


def test_wrong_recipient(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            _, frames = bus.h().signer.sign(Echo(b"x", "for h2"), "h2")
            await refused(bus, [bytes(f) for f in frames], "wrong-recipient")

    run(scenario())


def test_token_grant_from_a_holder(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            h1 = bus.dep.holders[0]
            body = {
                "token_id": "t", "run_id": "r", "holder": "h1", "chunk_index": 0, "mode": "travel",
                "lease_deadline": time.time() + 10, "sealed_params": b"", "report": {},
            }
            frames = craft(h1, "token.grant", body, "orch", now=time.time(), epoch=99)
            await refused(bus, frames, "wrong-role")
            assert bus.o.guard.fence == 0

    run(scenario())


def test_signed_as_h1_over_h2s_connection(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            frames = signed_echo(bus, "h1")
            await refused(bus, frames, "wrong-peer", via="h2")
            # h1's own message was not burnt by the attempt.
            assert await bus.inject(frames, via="h1") == "accepted"

    run(scenario())


def test_unknown_curve_key_gets_nothing_through(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            await bus.echo()
            outsider = NodeIdentity.generate("h1", Role.HOLDER)  # claims a member's name, own keys
            records = len(msg_records(bus.orch_log))
            judged = bus.judged()
            auth_rejected = bus.o.transport.stats.auth_rejected
            t = client_transport(outsider, bus.roster, *bus.endpoints)
            await t.start()
            try:
                for _ in range(5):
                    await t.send(signed_echo(bus))  # queued; never gets through the handshake
                await eventually(lambda: bus.o.transport.stats.auth_rejected > auth_rejected, what="ZAP refusal")
                await eventually(lambda: t.stats.handshake_failures > 0, what="client sees the refusal")
                assert not t.connected
                await bus.echo()
                await bus.echo("h2")
            finally:
                await t.close()
            assert bus.judged() == judged + 2  # only the two legit echoes
            assert len(msg_records(bus.orch_log)) == records + 4
            assert bus.o.transport.stats.extra.get("auth-unknown-key", 0) >= 1

    run(scenario())


# -- sizes and decode bombs ---------------------------------------------------------------------


def test_oversize_over_pipeline_limits(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            lim = bus.o.pipeline.limits
            now = time.time()
            h1 = bus.dep.holders[0]
            big_body = craft(h1, "echo", None, "orch", now=now, body_bytes=bytes(lim.max_body + 1))
            await refused(bus, big_body, "oversize")
            big_header = [MAGIC, bytes(lim.max_header + 1), b"\x80", bytes(64)]
            await refused(bus, big_header, "oversize")
            many = [MAGIC, b"\x80", b"\x80", bytes(64), *([b"b"] * lim.max_frames)]
            assert await bus.inject(many) == "dropped:transport-oversize"  # drained as it arrives, never judged
            await bus.echo()
            big_blob = craft(h1, "ship.segment", {"token_id": "t", "index": 0, "count": 1}, "orch", now=now, seq=2, blobs=[bytes(lim.max_blob + 1)])
            # MAXMSGSIZE is the largest frame the pipeline takes: libzmq drops the connection,
            # nothing reaches the node, and the holder is served again once it reconnects.
            n = bus.judged()
            await bus.h().transport.send(big_blob)
            await bus.echo(tries=5, timeout=2.0)
            assert bus.judged() == n + 1  # the echo only
            assert verify_log(bus.orch_log).ok

    run(scenario())


def test_oversize_near_transport_limit_keeps_log_readable(tmp_path: Path) -> None:
    """A frame just under MAXMSGSIZE gets to the pipeline: refused, and the log must stay verifiable."""

    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            huge = [MAGIC, b"\x80", bytes(DEFAULT_MAX_FRAME_BYTES - 4096), bytes(64)]
            await refused(bus, huge, "oversize")
            report = verify_log(bus.orch_log)
            assert report.ok, report.error
            assert report.rejected_records == 1
            # A restart reopens the log: every record must survive (a record the reader
            # cannot frame would be taken for a torn tail and cut off with all after it).
            before = verdicts(bus.orch_log)
            await bus.close_orchestrator()
            await bus.start_orchestrator()
            await bus.echo(tries=5, timeout=1.0)
            after = verdicts(bus.orch_log)
            assert after[: len(before)] == before
            assert verify_log(bus.orch_log).ok

    run(scenario(), timeout=60)


def test_oversize_over_transport_maxmsgsize(tmp_path: Path) -> None:
    """A frame over MAXMSGSIZE never reaches the node: libzmq drops the connection; the node serves on."""

    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            await bus.echo()
            judged = bus.judged()
            records = len(msg_records(bus.orch_log))
            h1 = bus.h().transport
            await h1.send([MAGIC, b"\x80", bytes(DEFAULT_MAX_FRAME_BYTES + 1), bytes(64)])
            await eventually(lambda: not h1.connected, 20, "libzmq to drop h1's connection")  # type: ignore[attr-defined]
            await bus.echo("h2")  # other holders are served meanwhile
            await bus.echo(tries=10, timeout=1.0)  # h1 reconnects and is served again
            # The oversize frame itself was never judged nor recorded (timed-out tries may arrive late).
            assert bus.judged() >= judged + 2
            assert sum(bus.o.rejected.values()) == 0
            assert all(v in ("accepted", "sent") for v in verdicts(bus.orch_log)[records:])

    run(scenario(), timeout=60)


def test_decode_bombs_in_header(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            sig = bytes(64)
            deep = b"\x91" * 1000 + b"\xc0"  # 1000 nested arrays: all max_header allows; parses, not a map
            await refused(bus, [MAGIC, deep, b"\x80", sig], "bad-header")
            deep_value = packb({"v": 1})[:-1] + b"\x91" * 1000 + b"\xc0"
            await refused(bus, [MAGIC, deep_value, b"\x80", sig], "bad-header")
            huge_array = b"\xdd\xff\xff\xff\xff"  # claims 4 G elements
            await refused(bus, [MAGIC, huge_array, b"\x80", sig], "bad-msgpack")
            huge_map = b"\xdf\xff\xff\xff\xff"
            await refused(bus, [MAGIC, huge_map, b"\x80", sig], "bad-msgpack")
            huge_bin = b"\xc6\xff\xff\xff\xff"
            await refused(bus, [MAGIC, huge_bin, b"\x80", sig], "bad-msgpack")
            ext = b"\xc7\x00\x05"  # zero-length ext 8
            await refused(bus, [MAGIC, ext, b"\x80", sig], "bad-msgpack")
            int_keys = packb({1: 2})
            await refused(bus, [MAGIC, int_keys, b"\x80", sig], "bad-msgpack")

    run(scenario())


def test_decode_bombs_in_signed_body(tmp_path: Path) -> None:
    """Bodies are decoded only after the signature; a member's signed bomb is still refused cleanly."""

    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            h1 = bus.dep.holders[0]
            bombs = [
                ("decode-bomb", b"\x91" * 200_000 + b"\xc0"),  # nesting far past msgpack's stack
                ("decode-bomb", b"\x81\xa1k" * 100_000 + b"\xc0"),
                ("bad-msgpack", b"\xdd\xff\xff\xff\xff"),  # an array claiming 4 G elements
                ("bad-msgpack", b"\xc7\x00\x05"),  # zero-length ext
                ("bad-body", packb([1, 2, 3])),
            ]
            for reason, body in bombs:
                session, seq = next_slot(bus.h(), "orch")
                frames = craft(h1, "echo", None, "orch", now=time.time(), session=session, seq=seq, body_bytes=body)
                # The guard committed (the signature verified) before the body was decoded.
                await refused(bus, frames, reason, marks_move=True)
                assert bus.o.guard.marks()[("h1", "orch")] == (session, seq + 1)  # and the echo after

    run(scenario())


# -- time ------------------------------------------------------------------------------------


def test_expired_message(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            old = MessageSigner(bus.dep.holders[0], clock=FakeClock(time.time() - 3600))
            _, frames = old.sign(Echo(b"late", "x"), "orch")
            await refused(bus, [bytes(f) for f in frames], "expired")
            future = MessageSigner(bus.dep.holders[0], clock=FakeClock(time.time() + 3600))
            _, frames = future.sign(Echo(b"early", "x"), "orch")
            await refused(bus, [bytes(f) for f in frames], "clock-skew")

    run(scenario())
