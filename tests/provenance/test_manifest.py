"""The signed training manifest of a real run, `gtbus export` with it, and `gtbus export --check` refusing tampering.

One completed run (real processes, sockets, keys and files) is shared; each
test works on its own copy of what the run left.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy
import pytest
from export_kit import gtbus_here as gtbus
from travel_kit import Travel, trained_keys

from gtbus.gpu.platform_key import load_platform_public
from gtbus.messages.identity import load_identity
from gtbus.provenance.commitment import chunk_commitment, commitment_key
from gtbus.provenance.document import read_document, sign_document, write_document
from gtbus.provenance.manifest import MANIFEST_DOMAIN, MANIFEST_FILE, check_consistency, parse_manifest
from gtbus.training.shards import Dataset

pytestmark = pytest.mark.slow
CHUNK = 16384


def manifest_of(t: Travel) -> dict[str, Any]:
    return json.loads((t.run_dir / "provenance" / MANIFEST_FILE).read_text())


def own_commitment(t: Travel, holder: str, chunk: int, run_id: str) -> bytes:
    """What the holder commits to for its chunk: recomputed here from its key and its data."""
    ident = load_identity(t.dep.keys / f"{holder}.key")
    tokens = Dataset([t.dep.shards[t.holder_names.index(holder)]]).chunk(chunk, CHUNK)
    return chunk_commitment(commitment_key(bytes(ident.signing_key), run_id), memoryview(numpy.ascontiguousarray(tokens, dtype="<u2")).cast("B"))


@pytest.fixture
def export_dir(finished_run: Travel, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    r = gtbus("export", finished_run.run_dir, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def resign(out: Path, t: Travel, edit: Any) -> None:
    """Edit the exported manifest's body and sign it again with the run's real orchestrator key."""
    doc = read_document(out / MANIFEST_FILE)
    body = json.loads(json.dumps(doc.body))
    edit(body)
    write_document(out / MANIFEST_FILE, sign_document(load_identity(t.dep.keys / "orch.key"), MANIFEST_DOMAIN, body))


def check(out: Path, t: Travel, *, logs: bool = True) -> subprocess.CompletedProcess[str]:
    more = ["--logs", t.logs, "--keys", t.dep.keys] if logs else []
    return gtbus("export", "--check", out, *more)


def fails(r: subprocess.CompletedProcess[str]) -> list[str]:
    assert r.returncode == 1, r.stdout + r.stderr
    return [line for line in r.stdout.splitlines() if line.startswith("FAIL ")]


def test_the_manifest_lists_every_trained_hop_with_what_its_holder_committed(finished_run: Travel) -> None:
    t = finished_run
    path = t.run_dir / "provenance" / MANIFEST_FILE
    assert path.stat().st_mode & 0o777 == 0o644
    m = parse_manifest(read_document(path), str(path))
    orch = load_identity(t.dep.keys / "orch.key").public
    assert m.orchestrator_key == orch.ed25519 and m.doc.verify(MANIFEST_DOMAIN, orch.ed25519)
    ckpt = t.checkpoint(state=False)
    assert m.run_id == ckpt.run_id
    # Exactly the checkpoint's trained hops, each chunk of each holder once per round, in epoch order.
    assert [(h.round, h.holder, h.chunk) for h in m.hops] == trained_keys(ckpt.hops)
    assert len(m.hops) == 2 * 2 * 3
    hops = {h["epoch"]: h for h in ckpt.hops}
    for h in m.hops:
        assert h.nbytes == hops[h.epoch]["nbytes"] == CHUNK * 2
        assert h.commitment == own_commitment(t, h.holder, h.chunk, m.run_id)
    # One run, one key: a chunk trained in both rounds carries the same commitment both times.
    assert {h.commitment for h in m.hops if h.round == 0} == {h.commitment for h in m.hops if h.round == 1}
    # The chain: each hop starts where the last ended, from the initial model; the grant reported that same model.
    grants = {g.epoch: g for g in t.grants()}
    assert m.hops[0].model_before == m.initial_model
    for a, b in zip(m.hops, m.hops[1:]):
        assert b.model_before == a.model_after
    for h in m.hops:
        assert grants[h.epoch].model_hash == h.model_before
    assert m.final_model == m.hops[-1].model_after == t.checkpoint_model_hash()
    assert check_consistency(m) == []
    body = m.body
    assert body["settings"]["chunk_tokens"] == CHUNK and body["settings"]["rounds"] == 2 and body["settings"]["gpus"] == 1
    assert body["attestation"]["emulated"] is True and body["attestation"]["kinds"] == ["emulated"]
    assert body["attestation"]["platform_key"] == load_platform_public(t.dep.platform_pub).hex()
    assert body["attestation"]["measurements"]["code"] == body["code_measurement"]
    # The evidence each holder appraised, by digest: one per holder, each what the logs show was sent to it.
    assert [(h, k) for h, k, _ in m.evidence] == [("h1", "emulated"), ("h2", "emulated")]
    assert body["discarded"] == [] and body["lost"] == [] and body["merges"] == []


def test_export_copies_the_manifest_and_check_passes_against_the_logs(finished_run: Travel, export_dir: Path) -> None:
    assert (export_dir / MANIFEST_FILE).read_bytes() == (finished_run.run_dir / "provenance" / MANIFEST_FILE).read_bytes()
    r = check(export_dir, finished_run)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok ") and r.stdout.count("\n") == 1 and "agrees with the logs" in r.stdout
    assert "pin it" not in r.stdout


def test_a_tampered_model_file_is_refused_in_one_line(finished_run: Travel, export_dir: Path) -> None:
    f = export_dir / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0x01  # one bit of the last tensor's data
    f.write_bytes(bytes(raw))
    found = fails(check(export_dir, finished_run))
    assert len(found) == 1 and "model" in found[0], found


def test_a_manifest_with_one_field_changed_is_refused_by_its_signature(finished_run: Travel, export_dir: Path) -> None:
    p = export_dir / MANIFEST_FILE
    data = json.loads(p.read_text())
    data["body"]["hops"][3]["nbytes"] += 2
    p.write_text(json.dumps(data))
    found = fails(check(export_dir, finished_run, logs=False))
    assert found == [found[0]] and "signature does not verify" in found[0]


def test_a_manifest_signed_by_another_key_is_refused_against_the_pinned_one(finished_run: Travel, export_dir: Path, tmp_path: Path) -> None:
    from gtbus.messages.identity import NodeIdentity

    doc = read_document(export_dir / MANIFEST_FILE)
    forger = NodeIdentity.generate("orch", "orchestrator")
    body = json.loads(json.dumps(doc.body))
    body["orchestrator"]["ed25519"] = forger.public.ed25519.hex()
    write_document(export_dir / MANIFEST_FILE, sign_document(forger, MANIFEST_DOMAIN, body))
    found = fails(check(export_dir, finished_run))
    assert any("not the pinned" in f for f in found) and any("not the one the logs pin" in f for f in found), found
    # Without a pin or logs the signature holds, under the key the manifest names: the check says whose,
    # and that nothing pinned it.
    r = check(export_dir, finished_run, logs=False)
    assert r.returncode == 0 and "signed by orch (a key the manifest names itself: pin it with --keys or --logs)" in r.stdout


@pytest.mark.parametrize(("edit", "expect"), [
    (lambda b: b["hops"].pop(4), "trained according to the logs, but the manifest does not list it"),
    (lambda b: b["hops"].append({**b["hops"][0], "epoch": 999}), "no grant of epoch 999"),
    (lambda b: b["hops"][2].update(commitment="ab" * 32), "signed"),
    (lambda b: b["hops"][2].update(holder="h2" if b["hops"][2]["holder"] == "h1" else "h1"), "the logs granted epoch"),
    (lambda b: b["attestation"]["evidence"][0].update(digest="ee" * 32), "was never sent to it in the logs"),
], ids=["hop-removed", "hop-added", "commitment-changed", "holder-swapped", "evidence-digest-changed"])
def test_a_resigned_manifest_that_disagrees_with_the_logs_is_refused(finished_run: Travel, export_dir: Path, edit: Any, expect: str) -> None:
    resign(export_dir, finished_run, edit)
    found = fails(check(export_dir, finished_run))
    assert any(expect in f for f in found), found
    # Each finding is one line, the command never a traceback.
    assert all("\n" not in f for f in found)


def test_a_chunk_listed_twice_in_a_round_is_a_finding_without_logs(finished_run: Travel, export_dir: Path) -> None:
    def twice(b: dict[str, Any]) -> None:
        b["hops"].insert(1, {**b["hops"][0], "epoch": b["hops"][0]["epoch"] + 1000})

    resign(export_dir, finished_run, twice)
    found = fails(check(export_dir, finished_run, logs=False))
    assert any("twice in round 0" in f for f in found), found


@pytest.mark.parametrize("damage", ["missing", "not-json", "not-a-document", "huge-number", "folder"])
def test_bad_manifest_files_get_one_line(finished_run: Travel, export_dir: Path, damage: str) -> None:
    p = export_dir / MANIFEST_FILE
    if damage == "missing":
        p.unlink()
    elif damage == "not-json":
        p.write_text('{"body": {"hops": [')
    elif damage == "not-a-document":
        p.write_text('[1, 2, 3]')
    elif damage == "huge-number":
        data = json.loads(p.read_text())
        data["body"]["hops"][0]["epoch"] = 10**400
        p.write_text(json.dumps(data))
    else:
        p.unlink()
        p.mkdir()
    r = check(export_dir, finished_run, logs=False)
    assert r.returncode != 0
    out = (r.stdout + r.stderr).strip()
    assert out.count("\n") == 0 and "Traceback" not in out, out
    assert MANIFEST_FILE in out or "FAIL" in out


def test_export_refuses_a_run_without_a_manifest_or_whose_checkpoint_moved_on(finished_run: Travel, tmp_path: Path) -> None:
    run = Path(shutil.copytree(finished_run.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("*.sock")))
    (run / "provenance" / MANIFEST_FILE).rename(run / "elsewhere.json")
    r = gtbus("export", run, "--out", tmp_path / "a")
    assert r.returncode == 1 and "the run has not completed" in r.stderr and r.stderr.count("\n") == 1
    r = gtbus("export", tmp_path / "nowhere", "--out", tmp_path / "a")
    assert r.returncode == 1 and "not a run folder" in r.stderr and r.stderr.count("\n") == 1
    (run / "elsewhere.json").rename(run / "provenance" / MANIFEST_FILE)
    resign_run = read_document(run / "provenance" / MANIFEST_FILE)
    body = json.loads(json.dumps(resign_run.body))
    body["final_model"] = "00" * 32
    write_document(run / "provenance" / MANIFEST_FILE, sign_document(load_identity(run / "keys" / "orch.key"), MANIFEST_DOMAIN, body))
    r = gtbus("export", run, "--out", tmp_path / "b")
    assert r.returncode == 1 and "is not the manifest's final model" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "b" / MANIFEST_FILE).exists()
