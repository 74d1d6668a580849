"""Sans-I/O tests of who may join a run (gtbus.protocol.enrolment)."""

from __future__ import annotations

from typing import Any

import pytest

from gtbus.messages.identity import Role
from gtbus.protocol.admission import RunShape
from gtbus.protocol.enrolment import Enrolment, Refused, Welcomed

SHAPE = RunShape(chunk_tokens=4096, max_chunks=8, vocab=256)
AGENTS = {"agent1"}


def manifest(total: int = 8192, **extra: Any) -> dict[str, Any]:
    return {"name": "d", "total_tokens": total, "token_dtype": "uint16", "max_token": 255, "digest_alg": "blake3", "digest": "ab" * 32, **extra}


def register(e: Enrolment, sender: str, role: Role | None, m: object = None, scheduled: dict[str, int] | None = None) -> Welcomed | Refused:
    return e.register(sender, role, manifest() if m is None else m, SHAPE, scheduled=scheduled, agents=AGENTS)


def test_holders_and_the_agents_they_write_through_complete_the_enrolment() -> None:
    e = Enrolment(["h1", "h2"])
    assert e.missing() == ["h1", "h2"] and not e.complete
    got = register(e, "h1", Role.HOLDER)
    assert isinstance(got, Welcomed) and got.manifest is not None and got.manifest.chunk_count == 2
    assert isinstance(register(e, "h2", Role.HOLDER, manifest(via="agent1")), Welcomed)
    assert e.via == {"h2": "agent1"} and e.missing() == ["agent1"] and not e.complete
    assert register(e, "agent1", Role.AGENT) == Welcomed()
    assert e.complete and e.missing() == []


@pytest.mark.parametrize(("sender", "role"), [("h3", Role.HOLDER), ("nobody", None), ("status", Role.OBSERVER), ("orch", Role.ORCHESTRATOR)])
def test_only_the_runs_holders_may_register(sender: str, role: Role | None) -> None:
    e = Enrolment(["h1"])
    assert register(e, sender, role) == Refused("not-a-holder", f"{sender} is not a holder of this run")
    assert e.manifests == {}


def test_a_manifest_that_does_not_fit_is_refused_with_admissions_code() -> None:
    e = Enrolment(["h1"])
    got = register(e, "h1", Role.HOLDER, manifest(max_token=300))
    assert isinstance(got, Refused) and got.code and "\n" not in got.reason
    assert register(e, "h1", Role.HOLDER, "not a manifest").code  # type: ignore[union-attr]
    assert e.manifests == {}


def test_via_must_be_a_device_agent_of_the_deployment() -> None:
    e = Enrolment(["h1"])
    assert register(e, "h1", Role.HOLDER, manifest(via="h2")) == Refused("bad-manifest", "'via' is not a device agent of this deployment")
    assert e.via == {} and e.manifests == {}


def test_after_scheduling_a_holder_must_bring_the_same_data() -> None:
    e = Enrolment(["h1"])
    first = register(e, "h1", Role.HOLDER)
    assert isinstance(first, Welcomed)
    scheduled = {"h1": 2}
    assert isinstance(register(e, "h1", Role.HOLDER, scheduled=scheduled), Welcomed)  # it reconnected
    other = register(e, "h1", Role.HOLDER, manifest(total=3 * 4096), scheduled=scheduled)
    assert isinstance(other, Refused)
    assert e.manifests["h1"] == first.manifest
    # Resumed orchestrator: nothing admitted yet, the schedule's count still binds.
    fresh = Enrolment(["h1"])
    assert register(fresh, "h1", Role.HOLDER, manifest(total=3 * 4096), scheduled=scheduled).code == "manifest-changed"  # type: ignore[union-attr]


def test_a_resumed_run_admits_only_the_data_its_checkpoint_knew() -> None:
    # After --resume the enrolment starts empty; the checkpoint's (token count, digest) per holder
    # is all it knows. The same chunk count with other data must not pass (gtbus sim seed 725 with
    # an orchestrator that forgets them).
    e = Enrolment(["h1"], known={"h1": (8192, "ab" * 32)})
    other_count_same_chunks = manifest(total=8000)
    assert register(e, "h1", Role.HOLDER, other_count_same_chunks, scheduled={"h1": 2}) == Refused(
        "manifest-changed", "other data than this run was scheduled with; start a new run for new data"
    )
    assert isinstance(register(e, "h1", Role.HOLDER, manifest(digest="cd" * 32), scheduled={"h1": 2}), Refused)
    assert e.manifests == {}
    assert isinstance(register(e, "h1", Role.HOLDER, manifest(), scheduled={"h1": 2}), Welcomed)


def test_a_holder_that_registers_again_without_an_agent_is_no_longer_staged_through_it() -> None:
    # Found in review: the old agent stayed in `via`, so it went on staging (and taking the
    # single-use ticket of) every hop of a holder that now writes locally.
    e = Enrolment(["h1"])
    assert isinstance(register(e, "h1", Role.HOLDER, manifest(via="agent1")), Welcomed)
    assert e.via == {"h1": "agent1"}
    assert isinstance(register(e, "h1", Role.HOLDER, manifest()), Welcomed)
    assert e.via == {} and e.missing() == [] and e.complete
