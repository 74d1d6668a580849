"""Holders appraise the orchestrator's evidence before their first provisioning: real processes, sockets, keys.

`gtbus holder --attest-policy FILE`: a policy that accepts the orchestrator's
evidence changes nothing of the run; one that does not (another platform key as
its root, another code pinned) makes every holder refuse with one line before
anything is written, and the run stops with that reason, as a wrong --pin-code does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gtbus.errors import GtbusError
from gtbus.gpu.platform_key import write_platform_key
from gtbus.nodes.launcher import LocalDeployment, LocalRun
from gtbus.training.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow


def _deployment(tmp_path: Path, policy: str, holders: int) -> tuple[LocalRun, LocalDeployment]:
    policy_path = tmp_path / "policy.toml"
    run = LocalRun(run_dir=tmp_path / "run", holders=holders, chunk_tokens=1 << 14, steps="2", bytes_per_holder=32 * 1024,
                   extra_holder_args=["--attest-policy", str(policy_path)])
    dep = LocalDeployment(run)
    # The policy names the deployment's platform key (made by LocalDeployment) or another one.
    policy_path.write_text(policy.format(platform=dep.platform_pub, pin=dep.pin))
    return run, dep


def test_a_policy_that_accepts_the_evidence_runs_as_before(tmp_path: Path) -> None:
    run, dep = _deployment(tmp_path, 'roots = ["{platform}"]\n[pinned]\ncode = "{pin}"\n[min_versions]\nemulated = "1"\n', holders=1)
    summary = dep.run_to_end(timeout=120)
    assert summary["hops_trained"] == summary["hops"] > 0
    err = (run.run_dir / "h1.err").read_text()
    assert f"h1: the orchestrator's emulated evidence appraised (code {dep.pin[:16]})" in err


# One refusal over real processes (each waits out the holders' stay); the other refusals (code, versions,
# nonce, bytes) are the same path with another line, tested in test_verifier_emulated.py.
@pytest.mark.parametrize(
    ("policy", "why"),
    [('roots = ["{other}"]\n[pinned]\ncode = "{pin}"\n', "emulated evidence: signature verifies under none of the policy's 1 platform keys")],
    ids=["other-platform-key"],
)
def test_a_policy_that_refuses_the_evidence_stops_the_run_before_any_provisioning(tmp_path: Path, policy: str, why: str) -> None:
    other = write_platform_key(tmp_path / "other")[1]
    run, dep = _deployment(tmp_path, policy.replace("{other}", str(other)), holders=2)
    with pytest.raises(GtbusError, match=r"every holder of the run refused this orchestrator's code measurement \(h1: the orchestrator's "
                                         rf"emulated evidence is refused: {why}; h2: .*\): .*or their --attest-policy refuses its evidence"):
        dep.run_to_end(timeout=120)
    for name in ("h1", "h2"):
        err = (run.run_dir / f"{name}.err").read_text().strip().splitlines()
        assert err[-1].startswith("Error: the orchestrator's emulated evidence is refused: "), err[-1]
        assert "Traceback" not in "\n".join(err)
        assert not any(" wrote " in line for line in err)  # nothing provisioned
    # A grant sent before the refusals arrived was declined with the refusal's reason (or not delivered): nothing trained.
    ckpt = run.run_dir / "checkpoints" / "orch.npz"
    if ckpt.exists():
        hops = read_checkpoint(ckpt, state=False).hops
        assert {h["outcome"] for h in hops} <= {"declined", "undelivered"}
        assert all("evidence is refused" in h["detail"] for h in hops if h["outcome"] == "declined")

def test_a_bad_policy_file_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    run, dep = _deployment(tmp_path, 'roots = ["{platform}"]\n[pinned]\ncode = "not hex"\n', holders=1)
    dep.start_holder(0)
    assert dep.holder_procs["h1"].wait(timeout=60) != 0
    err = (run.run_dir / "h1.err").read_text().strip().splitlines()
    assert err[-1] == f"Error: {tmp_path / 'policy.toml'}: pinned.code is not hex: 'not hex'"
