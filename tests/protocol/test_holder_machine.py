"""Sans-I/O tests of the holder's hop machine (gtbus.protocol.holder)."""

from __future__ import annotations

import pytest

from gtbus.protocol.holder import Action, HolderMachine, HolderPhase

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
