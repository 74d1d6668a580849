"""A log that spans a key rotation (restart with a new roster) verifies against each lifetime's roster."""

from __future__ import annotations

from pathlib import Path

from gtbus.messages.identity import NodeIdentity, Role, Roster
from gtbus.messages.signer import MessageSigner
from gtbus.messages.types import Echo
from gtbus.recording import Recorder
from gtbus.replay.verify import verify_log
from gtbus.testing import make_deployment


def test_each_lifetime_verifies_against_the_roster_it_recorded(tmp_path: Path) -> None:
    dep = make_deployment(tmp_path / "keys", holders=1)
    log = tmp_path / "orch.gtlog"
    old_roster = dep.roster
    rec = Recorder(log, "orch", old_roster)
    rec.record("in", MessageSigner(dep.holders[0]).sign(Echo(b"1", "old key"), "orch")[1], "accepted")
    rec.close()
    # h1's key was compromised and replaced; the orchestrator restarts with the new roster.
    new_h1 = NodeIdentity.generate("h1", Role.HOLDER)
    new_roster = Roster([dep.orchestrator.public, new_h1.public, dep.observer.public])
    rec = Recorder(log, "orch", new_roster)
    rec.record("in", MessageSigner(new_h1).sign(Echo(b"2", "new key"), "orch")[1], "accepted")
    rec.close()
    rep = verify_log(log)
    assert rep.ok, rep.error
    assert rep.checked == 2
    # Forcing one roster for the whole log shows which records it cannot vouch for.
    only_old = verify_log(log, old_roster)
    assert not only_old.ok and "record 3" in str(only_old.error) and "signature" in str(only_old.error)
