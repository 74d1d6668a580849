"""Holders' receipts of a real run, and `gtbus holder-receipt check` catching what does not match.

The shared run's holders stored the receipts the orchestrator sent them; each
test checks a copy of them (and of the manifest) against a holder's own key
and data, after damaging one thing.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
from export_kit import gtbus_here as gtbus
from travel_kit import Travel

from gtbus.messages.identity import NodeIdentity, load_identity
from gtbus.provenance.document import SignedDocument, read_document, sign_document, write_document
from gtbus.provenance.manifest import MANIFEST_DOMAIN, MANIFEST_FILE
from gtbus.provenance.receipt import RECEIPT_DOMAIN, manifest_digest

pytestmark = pytest.mark.slow


def receipt_path(t: Travel, holder: str) -> Path:
    run_id = t.checkpoint(state=False).run_id
    return t.run_dir / "receipts" / holder / f"{run_id}.json"


@pytest.fixture
def copies(finished_run: Travel, tmp_path: Path) -> dict[str, Path]:
    """Private copies of the manifest and h1's receipt, free to damage."""
    out = {"manifest": tmp_path / MANIFEST_FILE, "receipt": tmp_path / "receipt.json"}
    out["manifest"].write_bytes((finished_run.run_dir / "provenance" / MANIFEST_FILE).read_bytes())
    out["receipt"].write_bytes(receipt_path(finished_run, "h1").read_bytes())
    return out


def holder_check(t: Travel, copies: dict[str, Path], holder: str = "h1", data_of: str | None = None) -> subprocess.CompletedProcess[str]:
    data = t.dep.shards[t.holder_names.index(data_of or holder)]
    return gtbus("holder-receipt", "check", "--receipt", copies["receipt"], "--manifest", copies["manifest"],
                 "--key", t.dep.keys / f"{holder}.key", "--keys", t.dep.keys, "--data", data)


def fails(r: subprocess.CompletedProcess[str]) -> list[str]:
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("FAIL ")]
    assert lines and "Traceback" not in r.stdout + r.stderr
    return lines


def resign(path: Path, t: Travel, domain: bytes, edit: Callable[[dict[str, Any]], None], key: NodeIdentity | None = None) -> SignedDocument:
    body = json.loads(json.dumps(read_document(path).body))
    edit(body)
    doc = sign_document(key or load_identity(t.dep.keys / "orch.key"), domain, body)
    write_document(path, doc)
    return doc


def test_each_holder_stored_a_receipt_of_its_own_hops_only(finished_run: Travel) -> None:
    t = finished_run
    orch = load_identity(t.dep.keys / "orch.key").public.ed25519
    manifest = read_document(t.run_dir / "provenance" / MANIFEST_FILE)
    for name in t.holder_names:
        p = receipt_path(t, name)
        assert p.stat().st_mode & 0o777 == 0o600
        doc = read_document(p)
        assert doc.verify(RECEIPT_DOMAIN, orch)
        body = doc.body
        assert body["holder"] == name and body["manifest"] == manifest_digest(manifest).hex()
        mine = [h for h in manifest.body["hops"] if h["holder"] == name]
        assert body["hops"] == mine and len(mine) == 6  # 3 chunks, 2 rounds
        other = next(n for n in t.holder_names if n != name)
        assert other not in json.dumps(body)  # nothing of the other holder's hops
        assert f"receipt of run {body['run_id']} checked and stored" in t.stderr(name)


def test_holder_check_passes_for_every_holder(finished_run: Travel, tmp_path: Path) -> None:
    for name in finished_run.holder_names:
        copies = {"manifest": finished_run.run_dir / "provenance" / MANIFEST_FILE, "receipt": receipt_path(finished_run, name)}
        r = holder_check(finished_run, copies, name)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.startswith("ok ") and "6 hops" in r.stdout and r.stdout.count("\n") == 1


def test_a_receipt_signed_by_another_key_is_refused(finished_run: Travel, copies: dict[str, Path]) -> None:
    forger = NodeIdentity.generate("orch", "orchestrator")
    resign(copies["receipt"], finished_run, RECEIPT_DOMAIN, lambda b: b["orchestrator"].update(ed25519=forger.public.ed25519.hex()), key=forger)
    found = fails(holder_check(finished_run, copies))
    assert found == ["FAIL receipt signature does not verify under the orchestrator's pinned key"]


def test_an_edited_receipt_entry_is_refused(finished_run: Travel, copies: dict[str, Path]) -> None:
    data = json.loads(copies["receipt"].read_text())
    data["body"]["hops"][0]["chunk"] = 2
    copies["receipt"].write_text(json.dumps(data))
    found = fails(holder_check(finished_run, copies))
    assert any("receipt signature does not verify" in f for f in found), found


def test_another_holders_data_gives_other_commitments(finished_run: Travel, copies: dict[str, Path]) -> None:
    found = fails(holder_check(finished_run, copies, "h1", data_of="h2"))
    assert any("is not the" in f and "h1 computes from its data" in f for f in found), found


@pytest.mark.parametrize(("edit", "expect"), [
    (lambda b: b["hops"].append({**b["hops"][0], "epoch": b["hops"][0]["epoch"] + 100}), "listed twice in round 0"),
    (lambda b: b["hops"].append({**b["hops"][0], "epoch": 500, "chunk": 7}), "h1 has no chunk 7"),
    (lambda b: b["hops"].append({**next(h for h in b["hops"] if h["holder"] == "h1"), "epoch": 501, "round": 5, "commitment": "cd" * 32}), "is not the"),
    (lambda b: b["hops"].remove(next(h for h in b["hops"] if h["holder"] == "h1")), "is not in the manifest"),
], ids=["chunk-twice-in-a-round", "chunk-not-provided", "commitment-not-made", "receipted-hop-dropped"])
def test_a_resigned_manifest_the_holder_did_not_feed_is_refused(finished_run: Travel, copies: dict[str, Path], edit: Any, expect: str) -> None:
    resign(copies["manifest"], finished_run, MANIFEST_DOMAIN, edit)
    found = fails(holder_check(finished_run, copies))
    assert any(expect in f for f in found), found
    # The receipt names the manifest it came with: any other is told apart, even signed by the orchestrator.
    assert "FAIL receipt names another manifest (its manifest digest differs)" in found


def test_a_manifest_hop_of_this_holder_missing_from_its_receipt_is_a_finding(finished_run: Travel, copies: dict[str, Path]) -> None:
    doc = resign(copies["receipt"], finished_run, RECEIPT_DOMAIN, lambda b: b["hops"].pop())
    assert doc.verify(RECEIPT_DOMAIN, load_identity(finished_run.dep.keys / "orch.key").public.ed25519)
    found = fails(holder_check(finished_run, copies))
    assert found == [found[0]] and "names h1 but is not in its receipt" in found[0]


@pytest.mark.parametrize("damage", ["missing", "not-json", "wrong-types", "too-many-hops"])
def test_bad_receipt_files_get_one_line(finished_run: Travel, copies: dict[str, Path], damage: str) -> None:
    p = copies["receipt"]
    if damage == "missing":
        p.unlink()
    elif damage == "not-json":
        p.write_text("{")
    elif damage == "wrong-types":
        data = json.loads(p.read_text())
        data["body"]["hops"][0]["epoch"] = "1"
        p.write_text(json.dumps(data))
    else:
        data = json.loads(p.read_text())
        data["body"]["hops"] = data["body"]["hops"] * 2  # more than 3 chunks x 2 rounds
        p.write_text(json.dumps(data))
    r = holder_check(finished_run, copies)
    assert r.returncode == 1
    out = (r.stdout + r.stderr).strip()
    assert out.count("\n") == 0 and "Traceback" not in out and str(p) in out, out
