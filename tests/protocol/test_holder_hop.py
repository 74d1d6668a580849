"""Sans-I/O tests of the holder's side of a hop (gtbus.protocol.holder_hop): decisions, actions, every event in every phase."""

from __future__ import annotations

import pytest

from gtbus.protocol.holder_hop import (
    Action,
    Granted,
    HolderEvent,
    HolderMachine,
    HolderPhase,
    NEXT_PHASES,
    Provision,
    Refused,
    Revoked,
    SendAck,
    SendDecline,
    SendReturn,
    StopWriting,
    TRANSITIONS,
    Written,
)

NOW = 1_800_000_000.0
DEADLINE = NOW + 10.0


def test_grant_delivered_twice_is_idempotent() -> None:
    m = HolderMachine()
    first = m.on_grant("tok", 1, DEADLINE, NOW)
    assert first.action is Action.PROVISION
    state = (m.phase, m.current, m.last_epoch)
    # The same grant again (a retransmission, or the network duplicated it):
    # acknowledge again, start nothing.
    for _ in range(3):
        again = m.on_grant("tok", 1, DEADLINE, NOW + 1)
        assert again.action is Action.ACK_AGAIN
        assert (m.phase, m.current, m.last_epoch) == state
    # ... also after the hop was returned: still no second provisioning.
    m.returned("tok", 1)
    assert m.phase is HolderPhase.IDLE and m.current is None
    late = m.on_grant("tok", 1, DEADLINE, NOW + 2)
    assert late.action is Action.ACK_AGAIN
    assert m.phase is HolderPhase.IDLE and m.current is None


def test_duplicate_survives_even_past_its_lease() -> None:
    # Idempotence is by (token id, epoch), before the lease check: a copy that
    # arrives late must not turn into a decline of the hop being provisioned.
    m = HolderMachine()
    assert m.on_grant("tok", 1, DEADLINE, NOW).action is Action.PROVISION
    assert m.on_grant("tok", 1, DEADLINE, DEADLINE + 5).action is Action.ACK_AGAIN
    assert m.is_current("tok", 1)


@pytest.mark.parametrize("epoch", [3, 2])
def test_stale_or_replayed_grant_is_ignored(epoch: int) -> None:
    m = HolderMachine(last_epoch=3)
    d = m.on_grant("tok", epoch, DEADLINE, NOW)
    assert d.action is Action.IGNORE and "not above last seen 3" in d.reason
    assert m.phase is HolderPhase.IDLE and m.last_epoch == 3


def test_same_epoch_other_token_is_ignored() -> None:
    m = HolderMachine()
    assert m.on_grant("tok", 5, DEADLINE, NOW).action is Action.PROVISION
    assert m.on_grant("forged", 5, DEADLINE, NOW).action is Action.IGNORE
    assert m.is_current("tok", 5)


def test_grant_whose_lease_is_over_is_declined_and_not_reopened() -> None:
    m = HolderMachine()
    d = m.on_grant("tok", 1, DEADLINE, DEADLINE)
    assert d.action is Action.DECLINE and "lease" in d.reason
    assert m.phase is HolderPhase.IDLE and m.current is None
    # Its epoch is used up: a copy cannot make the holder provision it later.
    assert m.on_grant("tok", 1, DEADLINE + 100, NOW).action is Action.IGNORE


def test_revoke_aborts_only_the_hop_in_progress() -> None:
    m = HolderMachine()
    m.on_grant("tok", 1, DEADLINE, NOW)
    assert m.on_revoke("tok", 2) is False
    assert m.on_revoke("other", 1) is False
    assert m.is_current("tok", 1)
    assert m.on_revoke("tok", 1) is True
    assert m.phase is HolderPhase.IDLE and not m.is_current("tok", 1)
    assert m.on_revoke("tok", 1) is False  # a second revoke changes nothing
    # The revoked hop never comes back; the next one does.
    assert m.on_grant("tok", 1, DEADLINE, NOW).action is Action.IGNORE
    assert m.on_grant("tok", 2, DEADLINE, NOW).action is Action.PROVISION


def test_newer_grant_replaces_an_abandoned_hop() -> None:
    m = HolderMachine()
    m.on_grant("tok", 1, DEADLINE, NOW)
    # The revoke of hop 1 was lost; the orchestrator has moved on to hop 4.
    assert m.on_grant("tok", 4, DEADLINE, NOW).action is Action.PROVISION
    assert m.is_current("tok", 4) and not m.is_current("tok", 1)
    m.returned("tok", 1)  # the old hop's writer finishing late changes nothing
    assert m.is_current("tok", 4) and m.phase is HolderPhase.PROVISIONING
    m.failed("tok", 1)
    assert m.is_current("tok", 4)


def test_failed_hop_ends_provisioning() -> None:
    m = HolderMachine()
    m.on_grant("tok", 1, DEADLINE, NOW)
    m.failed("tok", 1)
    assert m.phase is HolderPhase.IDLE and m.current is None
    # A failed hop is not "completed": a copy of its grant is simply stale.
    assert m.on_grant("tok", 1, DEADLINE, NOW).action is Action.IGNORE


# -- events in, actions out ----------------------------------------------------------------



def test_a_hop_as_actions_grant_provision_write_return() -> None:
    m = HolderMachine()
    step = m.handle(Granted("tok", 1, DEADLINE, NOW))
    assert step.counted and step.actions == (Provision("tok", 1),)
    assert m.handle(Written("tok", 1)).actions == (SendReturn("tok", 1),)
    # Written twice (a writer finishing twice) returns once.
    again = m.handle(Written("tok", 1))
    assert not again.counted and again.actions == ()
    assert m.handle(Granted("tok", 1, DEADLINE, NOW)).actions == (SendAck("tok", 1),)
    assert [t[1] for t in m.trace] == ["Granted", "Written", "Written", "Granted"]


def test_refused_hop_is_declined_with_its_reason_and_revoke_stops_the_writer() -> None:
    m = HolderMachine()
    m.handle(Granted("tok", 1, DEADLINE, NOW))
    assert m.handle(Refused("tok", 1, "refused: bad report")).actions == (SendDecline("tok", 1, "refused: bad report"),)
    m.handle(Granted("tok", 2, DEADLINE, NOW))
    assert m.handle(Revoked("tok", 2)).actions == (StopWriting("tok", 2),)
    # Written after the revoke (the writer was already past its last check): nothing is returned.
    late = m.handle(Written("tok", 2))
    assert not late.counted and late.actions == () and m.phase is HolderPhase.IDLE


def test_expired_grant_while_provisioning_abandons_the_old_hop() -> None:
    m = HolderMachine()
    m.handle(Granted("tok", 1, DEADLINE, NOW))
    step = m.handle(Granted("tok", 2, NOW, NOW + 1))  # newer, but its lease is over on arrival
    assert step.actions == (SendDecline("tok", 2, "lease already expired on arrival"),)
    assert m.phase is HolderPhase.IDLE and not m.is_current("tok", 1)
    assert m.handle(Written("tok", 1)).actions == ()  # the abandoned hop's writer returns nothing


_EVENTS: list[HolderEvent] = [
    Granted("tok", 1, DEADLINE, NOW), Granted("tok", 1, DEADLINE, DEADLINE), Granted("tok", 0, DEADLINE, NOW),
    Granted("tok", 2, DEADLINE, NOW), Granted("x", 1, DEADLINE, NOW), Written("tok", 1), Written("tok", 9),
    Refused("tok", 1, "r"), Refused("x", 1), Revoked("tok", 1), Revoked("tok", 3),
]  # fmt: skip


@pytest.mark.parametrize("phase", list(HolderPhase))
@pytest.mark.parametrize("event", _EVENTS, ids=repr)
def test_every_event_in_every_phase_is_decided_without_raising(phase: HolderPhase, event: HolderEvent) -> None:
    m = HolderMachine()
    if phase is HolderPhase.PROVISIONING:
        m.handle(Granted("tok", 1, DEADLINE, NOW))
    assert m.phase is phase
    step = m.handle(event)
    assert m.phase in NEXT_PHASES[phase]
    if type(event) not in TRANSITIONS[phase]:
        assert not step.counted and step.actions == () and phase.value in step.reason
    # At most one hop is ever provisioned, and only the current one is returned.
    assert all(not isinstance(a, (SendReturn, StopWriting)) or (a.token_id, a.epoch) == ("tok", 1) for a in step.actions)
    assert (m.current is not None) == (m.phase is HolderPhase.PROVISIONING)


def test_a_grant_whose_deadline_is_not_a_time_is_declined() -> None:
    m = HolderMachine()
    step = m.handle(Granted("tok", 1, float("nan"), NOW))
    assert step.actions == (SendDecline("tok", 1, "lease already expired on arrival"),) and m.phase is HolderPhase.IDLE
