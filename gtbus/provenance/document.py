"""Signed JSON documents (the training manifest, a holder's receipt): one canonical encoding, one signature scheme.

Rules:

* A document is a JSON object ``{"body": {...}, "signature": HEX}``. The body
  holds only JSON objects, arrays, strings, integers, booleans and null: no
  floats, whose text has more than one spelling. Bytes are lowercase hex.
* The signature is Ed25519 by the signer's identity key (the key the
  deployment already pins for it, :mod:`gtbus.messages.identity`) over
  ``DOMAIN || canonical(body)``, where ``canonical`` is compact JSON with
  sorted keys, UTF-8, and ``DOMAIN`` names the kind of document and ends in
  a NUL byte: a receipt's signature can never pass for a manifest's, nor
  either for a message's (those are signed over the envelope's own domain).
* Reading one is bounded (size, depth) and every failure is one line naming
  the file and what is wrong (:class:`ProvenanceError`), never a traceback.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.signing

from gtbus.bounded_read import read_bounded
from gtbus.errors import GtbusError
from gtbus.messages.identity import NodeIdentity
from gtbus.private_files import write_private

#: The most bytes a signed document file may have (a manifest of ~100k hops).
MAX_DOCUMENT_BYTES = 64 << 20


class ProvenanceError(GtbusError):
    """A manifest, receipt or model file does not check out; the message is one line naming it."""


def canonical(body: Any) -> bytes:
    """The bytes a document's signature covers (after the domain): compact sorted-keys JSON, UTF-8, no floats."""
    _no_floats(body)
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _no_floats(value: Any, depth: int = 0) -> None:
    if depth > 16:
        raise ValueError("document nested too deeply")
    if isinstance(value, float):
        raise ValueError("documents hold no floats (their text is not canonical)")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError("document keys must be strings")
            _no_floats(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _no_floats(v, depth + 1)


@dataclass(frozen=True)
class SignedDocument:
    """A document's body and its signature (64 bytes)."""

    body: dict[str, Any]
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        """The document as stored and sent: ``{"body": ..., "signature": HEX}``."""
        return {"body": self.body, "signature": self.signature.hex()}

    def verify(self, domain: bytes, public_key: bytes) -> bool:
        """True if the signature is ``public_key``'s over ``domain`` and this body."""
        try:
            nacl.signing.VerifyKey(public_key).verify(domain + canonical(self.body), self.signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError, TypeError):
            return False
        return True


def sign_document(identity: NodeIdentity, domain: bytes, body: dict[str, Any]) -> SignedDocument:
    """Sign ``body`` under ``domain`` with ``identity``'s Ed25519 key."""
    return SignedDocument(body, identity.sign(domain + canonical(body)))


def document_from_json(data: Any, source: str) -> SignedDocument:
    """A document out of parsed JSON (or a peer's map); ProvenanceError naming ``source`` if it has not that shape."""
    if not isinstance(data, dict) or set(data) != {"body", "signature"}:
        raise ProvenanceError(f"{source}: not a signed gtbus document (expected exactly 'body' and 'signature')")
    body, sig = data["body"], data["signature"]
    if not isinstance(body, dict):
        raise ProvenanceError(f"{source}: its body is not an object")
    if not isinstance(sig, str) or len(sig) != 128:
        raise ProvenanceError(f"{source}: its signature is not 64 bytes of hex")
    try:
        signature = bytes.fromhex(sig)
        canonical(body)
    except ValueError as exc:
        raise ProvenanceError(f"{source}: {exc}") from None
    return SignedDocument(body, signature)


def read_document(path: str | os.PathLike[str]) -> SignedDocument:
    """Read a signed document file (bounded); ProvenanceError naming the file if missing, too big or malformed."""
    p = Path(path)
    raw = read_bounded(p, MAX_DOCUMENT_BYTES, "document", follow=True, error=ProvenanceError)
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProvenanceError(f"{p}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    return document_from_json(data, str(p))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def write_document(path: str | os.PathLike[str], doc: SignedDocument, *, mode: int = 0o644) -> Path:
    """Write ``doc`` atomically (never through a symlink); ``mode`` 0644: manifests and receipts are meant to be shown."""
    text = json.dumps(doc.to_json(), indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    return write_private(path, text, mode=mode)
