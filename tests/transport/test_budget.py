"""Per-peer budgets (sans-I/O): token buckets, role budgets and the record gate, on a fake clock."""

from __future__ import annotations

import pytest

from gtbus.messages.identity import Role
from gtbus.testing import FakeClock
from gtbus.transport.budget import ROLE_BUDGETS, Budget, PeerBudgets, TokenBucket, role_budgets


def test_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    b = TokenBucket(rate=10, burst=5, now=0.0)
    assert all(b.take(1, 0.0) for _ in range(5))
    assert not b.take(1, 0.0)
    assert b.take(1, 0.1)  # one token accrued in 0.1 s
    assert not b.take(1, 0.1)
    b.refill(100.0)
    assert b.level == 5  # never above the burst
    assert b.take(5, 100.0)
    assert not b.take(1, 50.0)  # a clock going backwards adds nothing


def test_messages_and_bytes_are_both_charged_and_counted_per_peer() -> None:
    clock = FakeClock()
    budgets = PeerBudgets(lambda _: Budget(3, 3, 1000, 1000), clock)
    assert [budgets.admit("a", 100) for _ in range(4)] == [True, True, True, False]
    assert budgets.admit("b", 1000)  # another peer has its own buckets
    assert not budgets.admit("b", 1)  # ... and its bytes are spent
    clock.advance(1.0)
    assert budgets.admit("a", 100)
    assert not budgets.admit("a", 2000)  # more than the byte burst never fits
    assert budgets.refused() == {"a": 2, "b": 1}


def test_refusal_records_are_gated_and_the_next_one_counts_those_left_out() -> None:
    clock = FakeClock()
    budgets = PeerBudgets(lambda _: Budget(1, 1, 1, 1), clock, records_per_s=2, record_burst=2)
    got = [budgets.record_refusal("a") for _ in range(10)]
    assert got == [0, 0] + [None] * 8
    assert budgets.unrecorded() == {"a": 8}
    clock.advance(0.5)
    assert budgets.record_refusal("a") == 8  # the next record says how many it stands for
    assert budgets.unrecorded() == {}


@pytest.mark.parametrize("role", list(Role))
def test_every_role_has_a_budget_and_strangers_get_the_smallest(role: Role) -> None:
    names = {"x": role}
    budget_of = role_budgets(names.get)
    assert budget_of("x") == ROLE_BUDGETS[role]
    smallest = min(ROLE_BUDGETS.values(), key=lambda b: b.messages_per_s)
    assert budget_of("nobody") == smallest


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="messages_per_s"):
        Budget(0, 1, 1, 1)
    with pytest.raises(ValueError, match="byte_burst"):
        Budget(1, 1, 1, float("nan"))
