"""Chunk commitments and signed documents: hiding keys, canonical bytes, domain separation, bounded reading."""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import pytest

from gtbus.messages.identity import NodeIdentity
from gtbus.provenance.commitment import CONTEXT, chunk_commitment, commitment_key
from gtbus.provenance.document import (
    ProvenanceError,
    canonical,
    document_from_json,
    read_document,
    sign_document,
    write_document,
)
from gtbus.provenance.manifest import MANIFEST_DOMAIN
from gtbus.provenance.receipt import RECEIPT_DOMAIN

SEED = bytes(range(32))


def test_the_commitment_is_keyed_blake3_under_a_key_only_the_holder_can_derive() -> None:
    key = commitment_key(SEED, "run1")
    # The reference: BLAKE3's own derive_key and keyed hash (the blake3 package), nothing hand-made.
    assert key == blake3.blake3(SEED + (4).to_bytes(4, "big") + b"run1", derive_key_context=CONTEXT).digest()
    data = b"\x01\x00\x02\x00" * 1000
    assert chunk_commitment(key, data) == blake3.blake3(data, key=key).digest()
    # Another run, another holder: another key; and the commitment is not the plain hash of the data.
    assert commitment_key(SEED, "run2") != key and commitment_key(bytes(32), "run1") != key
    assert chunk_commitment(key, data) != blake3.blake3(data).digest()
    # The run id boundary is length-prefixed: ("ab" seed-tail, "c") cannot collide with ("a", "bc").
    assert commitment_key(SEED, "run1x") != commitment_key(SEED, "run1")
    with pytest.raises(ValueError):
        commitment_key(b"short", "run1")


def test_canonical_bytes_are_sorted_compact_utf8_and_refuse_floats() -> None:
    assert canonical({"b": [1, "é"], "a": None}) == '{"a":null,"b":[1,"é"]}'.encode()
    for bad in ({"x": 1.5}, {"x": [float("nan")]}, {1: 2}):
        with pytest.raises(ValueError):
            canonical(bad)


def test_a_signature_is_bound_to_its_domain_and_its_body() -> None:
    ident = NodeIdentity.generate("orch", "orchestrator")
    doc = sign_document(ident, MANIFEST_DOMAIN, {"run_id": "r", "hops": [1, 2]})
    key = ident.public.ed25519
    assert doc.verify(MANIFEST_DOMAIN, key)
    assert not doc.verify(RECEIPT_DOMAIN, key)  # a manifest's signature never passes for a receipt's
    assert not doc.verify(MANIFEST_DOMAIN, NodeIdentity.generate("x", "orchestrator").public.ed25519)
    changed = document_from_json({"body": {"run_id": "r", "hops": [1, 3]}, "signature": doc.signature.hex()}, "t")
    assert not changed.verify(MANIFEST_DOMAIN, key)
    assert not document_from_json(doc.to_json(), "t").verify(MANIFEST_DOMAIN, b"\x00" * 31)  # a bad key is False, not a crash


def test_documents_round_trip_through_files(tmp_path: Path) -> None:
    ident = NodeIdentity.generate("orch", "orchestrator")
    doc = sign_document(ident, MANIFEST_DOMAIN, {"k": "v"})
    p = write_document(tmp_path / "m.json", doc)
    assert p.stat().st_mode & 0o777 == 0o644
    again = read_document(p)
    assert again == doc and again.verify(MANIFEST_DOMAIN, ident.public.ed25519)


@pytest.mark.parametrize(("content", "expect"), [
    (b"", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b'{"body": {}, "signature": "00"}', "signature is not 64 bytes"),
    (b'{"body": [], "signature": "' + b"0" * 128 + b'"}', "body is not an object"),
    (b'{"body": {}, "signature": "' + b"0" * 128 + b'", "more": 1}', "exactly 'body' and 'signature'"),
    (b'{"body": {"x": NaN}, "signature": "' + b"0" * 128 + b'"}', "not valid JSON"),
    (b'{"body": {"x": 1.5}, "signature": "' + b"0" * 128 + b'"}', "no floats"),
    (b'{"body": {"x": ' + b"[" * 5000 + b"]" * 5000 + b'}, "signature": "' + b"0" * 128 + b'"}', ""),
    (b'{"body": {}, "signature": "' + b"z" * 128 + b'"}', "hex"),
])
def test_malformed_documents_are_one_line_errors(tmp_path: Path, content: bytes, expect: str) -> None:
    p = tmp_path / "d.json"
    p.write_bytes(content)
    with pytest.raises(ProvenanceError) as ei:
        read_document(p)
    msg = str(ei.value)
    assert expect in msg and "\n" not in msg and str(p) in msg


def test_a_document_too_large_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    from gtbus.provenance.document import MAX_DOCUMENT_BYTES

    p = tmp_path / "big.json"
    with open(p, "wb") as fh:  # sparse: nothing but its size is written
        fh.truncate(MAX_DOCUMENT_BYTES + 1)
    with pytest.raises(ProvenanceError, match=f"over the {MAX_DOCUMENT_BYTES}-byte limit"):
        read_document(p)


@pytest.mark.parametrize("kind", ["fifo", "folder", "missing"])
def test_a_document_path_that_is_no_regular_file_is_one_line_and_never_waits(tmp_path: Path, kind: str) -> None:
    # A FIFO with no writer would block a plain open() forever: someone who can write the
    # export folder could hang every `export --check` with one.
    import os

    p = tmp_path / "manifest.json"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "folder":
        p.mkdir()
    with pytest.raises(ProvenanceError) as ei:
        read_document(p)
    msg = str(ei.value)
    assert str(p) in msg and "\n" not in msg
    assert ("is missing" if kind == "missing" else "is not a regular file") in msg
