"""Per-peer budgets in a live node: over budget is refused before the pipeline, and recorded boundedly."""

from __future__ import annotations

import random
from pathlib import Path

from bus_helpers import LiveBus, junk, msg_records, run, signed_echo

from gtbus.testing import FakeClock
from gtbus.transport.budget import Budget, PeerBudgets


def test_over_budget_is_refused_unverified_and_recorded_at_a_bounded_rate(tmp_path: Path) -> None:
    clock = FakeClock()  # drives the budgets only: nothing here waits on time
    budgets = PeerBudgets(lambda _: Budget(5, 5, 1 << 20, 1 << 20), clock, records_per_s=1, record_burst=2)

    async def scenario() -> None:
        async with LiveBus(tmp_path, budgets=budgets) as bus:
            for _ in range(5):
                assert await bus.inject(signed_echo(bus)) == "accepted"
            marks = bus.o.guard.marks()
            records = len(msg_records(bus.orch_log))
            for _ in range(10):  # valid and fresh, but over h1's message budget
                assert await bus.inject(signed_echo(bus)) == "rejected:over-budget"
            assert bus.o.guard.marks() == marks  # never verified, so nothing moved
            assert bus.o.rejected["over-budget"] == 10
            new = msg_records(bus.orch_log)[records:]
            assert [r.data["verdict"] for r in new] == ["rejected:over-budget"] * 2  # the record burst
            assert budgets.unrecorded() == {"h1": 8}

            clock.advance(1.0)  # one second: five messages and one record accrue
            rng = random.Random(3)
            verdict = await bus.inject(junk(rng, 1))
            assert verdict.startswith("rejected:") and verdict != "rejected:over-budget"
            last = msg_records(bus.orch_log)[-1]
            assert last.data["verdict"] == f"{verdict}+8"  # it stands for the eight left out
            await bus.echo()  # h1 is served again
            assert await bus.inject(signed_echo(bus, via="h2"), via="h2") == "accepted"  # h2 was never limited

    run(scenario())


def test_bytes_over_budget_are_refused_before_the_pipeline(tmp_path: Path) -> None:
    clock = FakeClock()
    budgets = PeerBudgets(lambda _: Budget(1000, 1000, 4096, 4096), clock)

    async def scenario() -> None:
        async with LiveBus(tmp_path, budgets=budgets) as bus:
            assert await bus.inject(signed_echo(bus, payload=bytes(3000))) == "accepted"
            assert await bus.inject(signed_echo(bus, payload=bytes(3000))) == "rejected:over-budget"
            clock.advance(1.0)
            assert await bus.inject(signed_echo(bus, payload=bytes(3000))) == "accepted"

    run(scenario())
