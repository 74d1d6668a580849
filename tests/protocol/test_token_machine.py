"""Sans-I/O tests of the orchestrator's token machine (gtbus.protocol.token).

Every allowed transition of ``TRANSITIONS`` is driven through the public
methods; every pair not in the table is refused (ProtocolError for the
orchestrator's own calls, an ignore verdict for holder messages, no change of
phase either way); the fencing verdicts name why a message did not count.
"""

from __future__ import annotations

import itertools

import pytest

from gtbus.errors import ProtocolError
from gtbus.protocol.token import ACCEPT, TRANSITIONS, Event, Phase, TokenMachine

NOW = 1_800_000_000.0
LEASE = 10.0
WIRE = {Event.ACK: "on_ack", Event.RETURN: "on_return", Event.DECLINE: "on_decline"}


def machine_in(phase: Phase) -> TokenMachine:
    """A machine brought to ``phase`` by allowed steps (holder h1, epoch 1)."""
    m = TokenMachine("tok", last_epoch=0)
    if phase is Phase.IDLE:
        return m
    m.grant("h1", NOW, LEASE)
    if phase is Phase.HELD:
        assert m.on_ack("h1", 1, "tok").accepted
    elif phase is Phase.RETURNED:
        assert m.on_return("h1", 1, "tok").accepted
    elif phase is Phase.REVOKED:
        m.revoke()
    assert m.phase is phase
    return m


def apply(m: TokenMachine, event: Event) -> object:
    """Apply ``event`` through the public API, as the orchestrator shell would."""
    if event is Event.GRANT:
        return m.grant("h2", NOW + 1, LEASE)
    if event in WIRE:
        return getattr(m, WIRE[event])(m.owner or "h1", m.epoch, m.token_id)
    if event is Event.EXPIRE:
        return m.expired(NOW + LEASE)
    if event is Event.REVOKE:
        return m.revoke()
    assert event is Event.FINISH
    return m.finish()


ALLOWED = [(p, e, n) for p, row in TRANSITIONS.items() for e, n in row.items()]
FORBIDDEN = [(p, e) for p, e in itertools.product(Phase, Event) if e not in TRANSITIONS[p]]


def test_table_covers_every_phase() -> None:
    assert set(TRANSITIONS) == set(Phase)
    assert all(set(row) <= set(Event) for row in TRANSITIONS.values())
    assert all(n in Phase for row in TRANSITIONS.values() for n in row.values())


@pytest.mark.parametrize(("phase", "event", "nxt"), ALLOWED, ids=[f"{p.value}-{e.value}" for p, e, _ in ALLOWED])
def test_every_allowed_transition(phase: Phase, event: Event, nxt: Phase) -> None:
    m = machine_in(phase)
    assert m.can(event)
    before = len(m.history)
    result = apply(m, event)
    assert m.phase is nxt
    if event in WIRE:
        assert result == ACCEPT
    if event is Event.EXPIRE:
        assert result is True
    assert [(e, n) for _, e, n in m.history[before:]] == [(event, nxt)]


@pytest.mark.parametrize(("phase", "event"), FORBIDDEN, ids=[f"{p.value}-{e.value}" for p, e in FORBIDDEN])
def test_every_forbidden_transition_is_refused(phase: Phase, event: Event) -> None:
    m = machine_in(phase)
    assert not m.can(event)
    epoch, owner, history = m.epoch, m.owner, list(m.history)
    if event in WIRE:
        # A holder's message cannot raise in the orchestrator: it is ignored, with the reason.
        verdict = apply(m, event)
        assert not verdict.accepted
        assert verdict.reason
    elif event is Event.EXPIRE:
        assert m.expired(NOW + 10 * LEASE) is False
    else:
        with pytest.raises(ProtocolError, match=f"{event.value} not allowed in phase {phase.value}"):
            apply(m, event)
    assert (m.phase, m.epoch, m.owner, m.history) == (phase, epoch, owner, history)


def test_grant_takes_a_new_epoch_above_every_earlier_one() -> None:
    m = TokenMachine("tok", last_epoch=41)  # e.g. the reservation found after a restart
    epochs = []
    for holder in ("h1", "h2", "h1"):
        g = m.grant(holder, NOW, LEASE)
        assert (g.token_id, g.holder, g.deadline) == ("tok", holder, NOW + LEASE)
        assert (m.owner, m.epoch, m.deadline) == (holder, g.epoch, NOW + LEASE)
        epochs.append(g.epoch)
        m.revoke()
        m.finish()
        assert (m.phase, m.owner, m.deadline) == (Phase.IDLE, None, None)
    assert epochs == [42, 43, 44]


def test_one_owner_at_a_time() -> None:
    m = machine_in(Phase.HELD)
    with pytest.raises(ProtocolError):
        m.grant("h2", NOW, LEASE)  # no second grant while h1 holds the token
    assert m.owner == "h1"


@pytest.mark.parametrize("lease", [0.0, -1.0])
def test_lease_must_be_positive(lease: float) -> None:
    m = TokenMachine("tok")
    with pytest.raises(ProtocolError, match="lease"):
        m.grant("h1", NOW, lease)
    assert m.phase is Phase.IDLE and m.epoch == 0


@pytest.mark.parametrize("phase", [Phase.GRANTED, Phase.HELD])
def test_lease_expires_at_the_deadline_not_before(phase: Phase) -> None:
    m = machine_in(phase)
    assert m.expired(NOW + LEASE - 0.001) is False
    assert m.phase is phase
    assert m.expired(NOW + LEASE) is True
    assert m.phase is Phase.REVOKED
    assert m.expired(NOW + 2 * LEASE) is False  # only once


# -- fencing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(WIRE.values()))
def test_fencing_verdicts(method: str) -> None:
    m = machine_in(Phase.GRANTED)
    m2 = machine_in(Phase.GRANTED)
    call = lambda *a: getattr(m, method)(*a)  # noqa: E731
    v = call("h1", 1, "other-token")
    assert not v.accepted and "unknown token" in v.reason
    v = call("h1", 0, "tok")
    assert not v.accepted and "epoch 0 is not the current epoch 1" in v.reason
    v = call("h1", 2, "tok")  # a future epoch is no better than a past one
    assert not v.accepted and "not the current epoch" in v.reason
    v = call("h2", 1, "tok")
    assert not v.accepted and "h2 does not own the token (owner h1)" in v.reason
    assert m.phase is Phase.GRANTED and m.history == m2.history
    assert call("h1", 1, "tok") == ACCEPT


def test_paused_ex_holder_is_fenced_after_the_next_grant() -> None:
    m = machine_in(Phase.HELD)  # h1 holds epoch 1
    assert m.expired(NOW + LEASE)
    m.finish()
    m.grant("h2", NOW + LEASE, LEASE)  # epoch 2
    # h1 wakes up and returns epoch 1: ignored, h2's hop undisturbed.
    v = m.on_return("h1", 1, "tok")
    assert not v.accepted and "epoch 1 is not the current epoch 2" in v.reason
    v = m.on_return("h1", 2, "tok")
    assert not v.accepted and "h1 does not own the token" in v.reason
    assert (m.phase, m.owner, m.epoch) == (Phase.GRANTED, "h2", 2)
    assert m.on_return("h2", 2, "tok").accepted


def test_duplicate_ack_counts_once() -> None:
    m = machine_in(Phase.GRANTED)
    assert m.on_ack("h1", 1, "tok").accepted
    v = m.on_ack("h1", 1, "tok")
    assert not v.accepted and "ack in phase held" in v.reason
    assert m.phase is Phase.HELD


def test_return_after_revoke_is_ignored() -> None:
    m = machine_in(Phase.HELD)
    m.revoke()
    v = m.on_return("h1", 1, "tok")
    assert not v.accepted and "return in phase revoked" in v.reason
    m.finish()
    v = m.on_return("h1", 1, "tok")  # after the epilogue: the token is the orchestrator's
    assert not v.accepted and "does not own" in v.reason


def test_token_ids_are_random_by_default() -> None:
    assert TokenMachine().token_id != TokenMachine().token_id
    assert len(TokenMachine().token_id) == 16
