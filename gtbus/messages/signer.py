"""The sending side of the envelope: numbering, stamping and signing messages."""

from __future__ import annotations

from typing import Sequence

import msgpack

from gtbus.clock import SYSTEM_CLOCK, Clock
from gtbus.messages.envelope import (
    BROADCAST,
    MAGIC,
    VERSION,
    Header,
    new_message_id,
    new_session_id,
    blob_digest,
    checked_header,
    signing_input_digest,
)
from gtbus.messages.identity import NodeIdentity
from gtbus.messages.primitives import PreparedSigner
from gtbus.messages.registry import body_to_wire, spec_of


class MessageSigner:
    """Turns message objects into signed frames for one node.

    Holds the node's session id (new for every process start) and one sequence
    counter per stream (recipient, or ``*`` for broadcasts).
    """

    def __init__(self, identity: NodeIdentity, clock: Clock = SYSTEM_CLOCK, *, ttl: float = 30.0) -> None:
        self.identity = identity
        self.clock = clock
        self.ttl = ttl
        self.session = new_session_id(int(clock.time() * 1e9))
        self._seq: dict[str, int] = {}
        self.last_blob_digest = b""
        # The same key as identity.sign; a nonce prepared while the node waits takes three
        # quarters of a signature off the path of the next message (see PreparedSigner).
        self._ed25519 = PreparedSigner(bytes(identity.signing_key), self.session)
        # envelope.packb's encoding, one packer per signer (a signer is used by one thread, like its counters)
        self._pack = msgpack.Packer(use_bin_type=True).pack

    @property
    def ready(self) -> bool:
        """True if the next signature will come from a prepared nonce."""
        return self._ed25519.prepared > 0

    def prepare(self, count: int = 1) -> None:
        """Prepare nonces until ``count`` are ready (about one signature's cost each).

        Call it when the node is about to wait (after sending); a signature made
        without one costs what it did before.
        """
        missing = count - self._ed25519.prepared
        if missing > 0:
            self._ed25519.prepare(missing)

    def sign(
        self,
        msg: object,
        recipient: str,
        *,
        epoch: int = 0,
        parent: bytes | None = None,
        blobs: Sequence[bytes | memoryview] = (),
        ttl: float | None = None,
    ) -> tuple[Header, list[bytes | memoryview]]:
        """Sign ``msg`` for ``recipient``; return its header and the frames to send."""
        spec = spec_of(msg)
        if recipient == BROADCAST and not spec.broadcast:
            raise ValueError(f"{spec.name} is not a broadcast type")
        if self.identity.role not in spec.senders:
            raise ValueError(f"a {self.identity.role.value} may not send {spec.name}")
        if len(blobs) > spec.max_blobs:
            raise ValueError(f"{spec.name} takes at most {spec.max_blobs} blobs")
        seq = self._seq.get(recipient, 0) + 1
        self._seq[recipient] = seq
        now = self.clock.time()
        wire = {  # Header's fields, in its order: what Header.to_wire() gives
            "v": VERSION,
            "id": new_message_id(),
            "type": spec.name,
            "sender": self.identity.name,
            "recipient": recipient,
            "session": self.session,
            "seq": seq,
            "ts": now,
            "exp": now + (self.ttl if ttl is None else ttl),
            "epoch": epoch,
            "parent": parent,
        }
        header = checked_header(wire)
        header_bytes = self._pack(wire)
        body_bytes = self._pack(body_to_wire(msg))
        self.last_blob_digest = blob_digest(blobs)  # the recorder reuses it rather than hash bulk data twice
        signature = self._ed25519.sign(signing_input_digest(header_bytes, body_bytes, self.last_blob_digest))
        return header, [MAGIC, header_bytes, body_bytes, signature, *blobs]
