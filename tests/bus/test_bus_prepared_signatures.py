"""Signatures from prepared nonces on a live bus (real CURVE sockets): the fast path keeps every check.

After a send, a node prepares the nonce of its next signature while it waits
(:class:`~gtbus.messages.primitives.PreparedSigner`). Messages signed that way
must pass the orchestrator's pipeline, and everything the pipeline refused
before must still be refused: a forged or non-canonical signature, a replay, a
peer over its budget. Both logs stay verifiable offline.
"""

from __future__ import annotations

from pathlib import Path

from bus_helpers import LiveBus, eventually, msg_records, run, signed_echo

from gtbus.messages.envelope import signing_input
from gtbus.messages.identity import NodeIdentity, Role
from gtbus.messages.primitives import PreparedSigner, ed25519_sign
from gtbus.replay.verify import verify_log
from gtbus.testing import FakeClock
from gtbus.transport.budget import Budget, PeerBudgets

L = 2**252 + 27742317777372353535851937790883648493


async def prepared_echo(bus: LiveBus) -> list[bytes]:
    """A valid Echo from h1 whose signature came from a prepared nonce (checked: it is not RFC 8032's)."""
    h1 = bus.h()
    h1.signer.prepare()  # a no-op when the runtime already did, after its last send
    frames = signed_echo(bus)
    assert not h1.signer.ready  # the nonce was taken
    seed = bytes(bus.dep.holders[0].signing_key)
    assert frames[3] != ed25519_sign(seed, signing_input(frames[1], frames[2], []))
    return frames


def test_prepared_signatures_are_accepted_and_every_refusal_still_holds(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            await bus.echo()  # both ends sent: both prepare while they wait
            await eventually(lambda: bus.h().signer.ready and bus.o.signer.ready, what="both ends to prepare")
            await bus.echo()  # a reply signed from a prepared nonce verifies at h1

            frames = await prepared_echo(bus)
            sig = frames[3]
            # S + L: the same signature to a lax verifier, refused by libsodium's strict one.
            s_plus_l = sig[:32] + (int.from_bytes(sig[32:], "little") + L).to_bytes(32, "little")
            assert await bus.inject([*frames[:3], s_plus_l]) == "rejected:bad-signature"
            # Mallory's key, its own prepared nonce, claiming to be h1.
            mallory = PreparedSigner(bytes(NodeIdentity.generate("h1", Role.HOLDER).signing_key), b"m")
            mallory.prepare()
            forged = mallory.sign(signing_input(frames[1], frames[2], []))
            assert await bus.inject([*frames[:3], forged]) == "rejected:bad-signature"
            marks = bus.o.guard.marks()
            assert await bus.inject(frames) == "accepted"  # nothing above burnt its sequence
            assert bus.o.guard.marks() != marks
            assert await bus.inject(frames) == "rejected:replay"
            await bus.echo()
        for log in (bus.orch_log, tmp_path / "run" / "logs" / "h1.gtlog"):
            report = verify_log(log)
            assert report.ok, report.error

    run(scenario())


def test_prepared_signatures_over_budget_are_refused_before_the_pipeline(tmp_path: Path) -> None:
    clock = FakeClock()  # drives the budgets only
    budgets = PeerBudgets(lambda _: Budget(3, 3, 1 << 20, 1 << 20), clock)

    async def scenario() -> None:
        async with LiveBus(tmp_path, budgets=budgets) as bus:
            await bus.echo()  # one of h1's three
            for _ in range(2):
                assert await bus.inject(await prepared_echo(bus)) == "accepted"
            marks = bus.o.guard.marks()
            over = await prepared_echo(bus)
            assert await bus.inject(over) == "rejected:over-budget"
            assert bus.o.guard.marks() == marks  # never verified, nothing moved
            assert msg_records(bus.orch_log)[-1].data["verdict"] == "rejected:over-budget"
            clock.advance(1.0)
            assert await bus.inject(over) == "accepted"  # refused unjudged: still fresh

    run(scenario())


def test_a_runtime_told_not_to_prepare_signs_on_the_path(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with LiveBus(tmp_path) as bus:
            h1 = bus.h()
            await bus.echo()
            assert h1.signer.ready  # prepared after the send, before the reply came back
            h1.prepare_signatures = False
            await bus.echo()  # takes the nonce prepared before, prepares none
            assert not h1.signer.ready
            await bus.echo()  # RFC 8032 on the path: still accepted and answered

    run(scenario())
