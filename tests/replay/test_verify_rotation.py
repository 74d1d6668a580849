"""Which roster a log is verified against: given on the command line, or pinned at its first record.

A restart records its roster again. Without ``--keys`` that roster counts only
when the recording node's already-trusted key signed the checkpoint right after
it; a roster appended by someone without that key is refused, with whatever
was forged under it.
"""

from __future__ import annotations

from pathlib import Path

import msgpack

from gtbus.messages.identity import NodeIdentity, Role, Roster
from gtbus.messages.signer import MessageSigner
from gtbus.messages.types import Echo
from gtbus.recording import Recorder, read_log
from gtbus.replay.verify import verify_log
from gtbus.testing import make_deployment
from logkit import rechain


def _echo(sender: NodeIdentity, text: str) -> list[bytes]:
    return MessageSigner(sender).sign(Echo(b"1", text), "orch")[1]


def _lifetime(log: Path, roster: Roster, orch: NodeIdentity, sender: NodeIdentity, text: str) -> None:
    """One process lifetime of the orchestrator's log: start, one accepted echo, clean close."""
    rec = Recorder(log, "orch", roster, identity=orch)
    rec.record("in", _echo(sender, text), "accepted")
    rec.close()


def test_holder_key_rotation_is_vouched_for_by_the_orchestrator_key(tmp_path: Path) -> None:
    dep = make_deployment(tmp_path / "keys", holders=1)
    log = tmp_path / "orch.gtlog"
    old_roster = dep.roster
    _lifetime(log, old_roster, dep.orchestrator, dep.holders[0], "old key")
    # h1's key was compromised and replaced; the orchestrator (same key) restarts with the new roster.
    new_h1 = NodeIdentity.generate("h1", Role.HOLDER)
    new_roster = Roster([dep.orchestrator.public, new_h1.public, dep.observer.public])
    _lifetime(log, new_roster, dep.orchestrator, new_h1, "new key")
    rep = verify_log(log)
    assert rep.ok, rep.error
    assert rep.checked == 2 and rep.unsigned_tail == 0 and rep.closed
    # Both rosters given: each record is vouched for by one of them.
    assert verify_log(log, [old_roster, new_roster]).ok
    # Forcing one roster for the whole log names the first record it cannot vouch for.
    index = next(r.index for r in read_log(log) if r.kind == "msg" and r.index > 4)
    only_old = verify_log(log, old_roster)
    assert not only_old.ok and f"record {index} " in str(only_old.error) and "signature" in str(only_old.error)


def test_orchestrator_own_key_rotation_needs_the_operator_keys(tmp_path: Path) -> None:
    dep = make_deployment(tmp_path / "keys", holders=1)
    log = tmp_path / "orch.gtlog"
    _lifetime(log, dep.roster, dep.orchestrator, dep.holders[0], "before")
    new_orch = NodeIdentity.generate("orch", Role.ORCHESTRATOR)
    new_roster = Roster([new_orch.public, dep.holders[0].public, dep.observer.public])
    _lifetime(log, new_roster, new_orch, dep.holders[0], "after")
    # The new key cannot vouch for itself: the pinned roster does not know it.
    rep = verify_log(log)
    assert not rep.ok and "not vouched for" in str(rep.error) and "--keys" in str(rep.error)
    # The operator vouches for both keys.
    both = verify_log(log, [dep.roster, new_roster])
    assert both.ok, both.error
    assert both.checked == 2 and both.closed


def test_roster_appended_mid_log_with_forged_records_is_refused(tmp_path: Path) -> None:
    """An attacker with the file, not the orchestrator's key, adds a roster of its own and a record under it."""
    dep = make_deployment(tmp_path / "keys", holders=1)
    log = tmp_path / "orch.gtlog"
    _lifetime(log, dep.roster, dep.orchestrator, dep.holders[0], "real")
    evil_h1 = NodeIdentity.generate("h1", Role.HOLDER)
    evil = Roster([dep.orchestrator.public, evil_h1.public, dep.observer.public])
    records = [msgpack.packb(r.data, use_bin_type=True) for r in read_log(log)]
    meta = {"kind": "meta", "node": "orch", "t": 1.0, "pid": 1, "roster": [m.to_json() for m in evil]}
    forged = {"kind": "msg", "dir": "in", "t": 2.0, "verdict": "accepted", "peer": "h1", "ch": "direct", "frames": _echo(evil_h1, "forged")}
    rechain(log, records + [msgpack.packb(meta, use_bin_type=True), msgpack.packb(forged, use_bin_type=True)])
    rep = verify_log(log)
    assert not rep.ok
    assert f"record {len(records) + 1} " in str(rep.error) and "not vouched for" in str(rep.error)
    # Against the real keys the forged record itself fails.
    real = verify_log(log, dep.roster)
    assert not real.ok and "bad-signature" in str(real.error)
    # Without the forged roster, the forged record fails against the pinned one.
    rechain(log, records + [msgpack.packb(forged, use_bin_type=True)])
    assert "bad-signature" in str(verify_log(log).error)
