"""Every message gtbus sends, declared once with the roles allowed to send it.

The header (see :mod:`gtbus.messages.envelope`) carries routing, ordering and
the token epoch; these bodies carry only what is particular to each type.
``docs/protocol.md`` lists them; a test checks the list and this module agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gtbus.messages.identity import Role
from gtbus.messages.registry import message

ORCH = {Role.ORCHESTRATOR}
HOLDER = {Role.HOLDER}
ANY_ROLE = set(Role)


# --- liveness and the foundation's request/reply -------------------------------------------


@message("heartbeat", senders=ANY_ROLE, broadcast=True)
@dataclass(frozen=True)
class Heartbeat:
    """Application heartbeat from the event loop: proves the node is scheduling, not just connected."""

    state: str
    uptime: float


#: Echo payloads are for liveness checks and latency benchmarks, not for bulk: a peer
#: may not make the server hold, record and send back more than this per echo.
ECHO_MAX_PAYLOAD = 4096
ECHO_MAX_NOTE = 256


def _check_echo(payload: bytes, note: str) -> None:
    if len(payload) > ECHO_MAX_PAYLOAD or len(note) > ECHO_MAX_NOTE:
        raise ValueError(f"echo payload over {ECHO_MAX_PAYLOAD} bytes or note over {ECHO_MAX_NOTE} characters")


@message("echo", senders=ANY_ROLE)
@dataclass(frozen=True)
class Echo:
    """A request answered by :class:`EchoReply` with the same payload (demo, benchmarks, health checks)."""

    payload: bytes
    note: str

    def __post_init__(self) -> None:
        _check_echo(self.payload, self.note)


@message("echo.reply", senders=ANY_ROLE)
@dataclass(frozen=True)
class EchoReply:
    """The answer to :class:`Echo`; its header's parent is the echo's id."""

    payload: bytes
    note: str

    def __post_init__(self) -> None:
        _check_echo(self.payload, self.note)


@message("refusal", senders=ANY_ROLE)
@dataclass(frozen=True)
class Refusal:
    """A request was understood but refused; ``reason`` is one line for a person."""

    code: str
    reason: str


# --- setup: registration, measurement, snapshot ----------------------------------------------


@message("register", senders=HOLDER | {Role.AGENT})
@dataclass(frozen=True)
class Register:
    """A holder joins the run with its dataset manifest (sizes and a digest commitment)."""

    manifest: dict[str, Any]
    software: str


@message("welcome", senders=ORCH)
@dataclass(frozen=True)
class Welcome:
    """The orchestrator admits a holder and hands it the run id and the signed measurement."""

    run_id: str
    report: dict[str, Any]
    schedule: dict[str, Any]


#: An appraiser's nonce (gtbus.attest.verifier.NONCE_SIZE) and the longest evidence kind name.
ATTEST_NONCE_SIZE = 32
ATTEST_MAX_KIND = 32


@message("attest.request", senders=HOLDER)
@dataclass(frozen=True)
class AttestRequest:
    """A holder asks for the orchestrator's evidence of ``kind``, bound to its fresh nonce (answered by attest.evidence or a refusal)."""

    nonce: bytes
    kind: str

    def __post_init__(self) -> None:
        if not (isinstance(self.nonce, bytes) and len(self.nonce) == ATTEST_NONCE_SIZE
                and isinstance(self.kind, str) and 0 < len(self.kind) <= ATTEST_MAX_KIND):
            raise ValueError(f"attest.request: nonce must be {ATTEST_NONCE_SIZE} bytes and kind 1..{ATTEST_MAX_KIND} characters")


@message("attest.evidence", senders=ORCH)
@dataclass(frozen=True)
class AttestEvidence:
    """The orchestrator's evidence for a holder's nonce (gtbus.attest.verifier.Evidence as wire data; the holder bounds and appraises it)."""

    evidence: dict[str, Any]


@message("measurement", senders=ORCH, broadcast=True)
@dataclass(frozen=True)
class MeasurementPublished:
    """Signed measurement report of code + model + device (published at setup and after each hop)."""

    report: dict[str, Any]


@message("snapshot.request", senders=ANY_ROLE)
@dataclass(frozen=True)
class SnapshotRequest:
    """A late joiner asks for the current state (zguide Clone pattern)."""

    since: int


#: What a snapshot tells a holder or agent: the run's public progress. An observer's
#: snapshot adds the loss of the last chunk (evaluated on a holder's data).
SNAPSHOT_PUBLIC_FIELDS = frozenset({
    "run_id", "token", "holders", "liveness", "hops", "hops_trained", "bytes", "round", "rounds", "hops_total",
    "hop_started", "started", "complete",
    "lanes",  # per GPU token: holder, epoch, phase (as token.state events already tell everyone), why a lane retired
})


@message("snapshot", senders=ORCH)
@dataclass(frozen=True)
class Snapshot:
    """State at ``event_seq``; apply only events with a higher sequence after it (a holder's: public fields only)."""

    state: dict[str, Any]
    event_seq: int


# --- the token and the hop ----------------------------------------------------------------------


@message("token.grant", senders=ORCH, fenced=True)
@dataclass(frozen=True)
class TokenGrant:
    """Hands the GPU token to one holder for one hop; the new channel params are sealed to it.

    The header's epoch is the hop's epoch. ``sealed_params`` opens only with the
    holder's X25519 key; ``report`` is the signed measurement binding this hop's
    channel key (by commitment) to the code and model the holder pinned.
    """

    token_id: str
    run_id: str
    holder: str
    chunk_index: int
    mode: str  # "travel" (holder writes the device staging) or "ship" (conventional path)
    lease_deadline: float
    sealed_params: bytes
    report: dict[str, Any]

    def __post_init__(self) -> None:
        if self.mode not in ("travel", "ship"):
            raise ValueError(f"unknown mode {self.mode!r}")


@message("token.prepare", senders=ORCH)
@dataclass(frozen=True)
class HopPrepare:
    """The next hop's channel params, sealed to the holder the schedule names next, sent while the current hop runs.

    A hint, never authority: the holder may open the params and map the staging
    they name while it waits, so that a grant carrying the *same* sealed params
    starts writing at once. The grant alone decides (its report is verified
    before a byte is written; epoch and lease are its own); a preparation no
    grant names is dropped. It carries no epoch: the hop has none until granted.
    """

    token_id: str
    run_id: str
    holder: str
    chunk_index: int
    sealed_params: bytes


@message("token.ack", senders=HOLDER, fenced=True)
@dataclass(frozen=True)
class TokenAck:
    """The holder accepted the grant (sent again if the grant arrives twice)."""

    token_id: str


#: A chunk commitment's size: the holder's keyed BLAKE3 of the chunk's plaintext (gtbus.provenance.commitment).
CHUNK_COMMITMENT_SIZE = 32


@message("token.return", senders=HOLDER, fenced=True)
@dataclass(frozen=True)
class TokenReturn:
    """The holder has written its segments, closed its mapping and gives the token back.

    ``chunk_commitment`` is the holder's signed claim of which plaintext it sent:
    a keyed BLAKE3 hash (key known only to the holder) of the chunk's token bytes.
    It goes into the training manifest and the holder's receipt.
    """

    token_id: str
    chunk_index: int
    segments: int
    nbytes: int
    ciphertext_digest: bytes
    chunk_commitment: bytes

    def __post_init__(self) -> None:
        if not (isinstance(self.chunk_commitment, bytes) and len(self.chunk_commitment) == CHUNK_COMMITMENT_SIZE):
            raise ValueError(f"token.return: chunk_commitment must be {CHUNK_COMMITMENT_SIZE} bytes")


@message("token.decline", senders=HOLDER, fenced=True)
@dataclass(frozen=True)
class TokenDecline:
    """The holder refuses a grant (bad measurement, no data left); the token comes back unused."""

    token_id: str
    reason: str


@message("ship.segment", senders=HOLDER, fenced=True, max_blobs=1)
@dataclass(frozen=True)
class ShipSegment:
    """Conventional path: one AEAD segment (ciphertext || tag in the blob) sent over the network."""

    token_id: str
    index: int
    count: int


@message("token.revoke", senders=ORCH, fenced=True)
@dataclass(frozen=True)
class TokenRevoke:
    """The orchestrator takes the token back (lease expired, bad return); the holder (and a device agent) must stop."""

    token_id: str
    reason: str


# --- events --------------------------------------------------------------------------------------


@message("token.state", senders=ORCH, broadcast=True)
@dataclass(frozen=True)
class TokenState:
    """Who holds the token, at which epoch, in which phase."""

    token_id: str
    owner: str
    epoch: int
    phase: str


#: What every node may learn of a hop: the schedule shows who held the token, for which
#: chunk and whether the chunk comes back later, and every chunk but a holder's last is
#: ``chunk_tokens`` long. Losses, timings and refusal details stay out: they are computed
#: from the holder's data (DESIGN §7, "what a holder receives tells it nothing about
#: other holders' data").
HOP_PUBLIC_FIELDS = frozenset({"round", "mode", "nbytes"})


@message("hop.record", senders=ORCH, broadcast=True)
@dataclass(frozen=True)
class HopRecord:
    """The public line of one hop, broadcast: holder, chunk, outcome; ``record`` holds only :data:`HOP_PUBLIC_FIELDS`."""

    epoch: int
    holder: str
    chunk_index: int
    outcome: str
    record: dict[str, Any]


@message("hop.report", senders=ORCH)
@dataclass(frozen=True)
class HopReport:
    """What one hop did in full (timings, losses, detail): sent only to the hop's holder and to observers, never broadcast."""

    epoch: int
    holder: str
    chunk_index: int
    outcome: str
    record: dict[str, Any]


#: The part of the run's summary every node may see; the losses (evaluated on holders'
#: chunks) and the orchestrator's paths go to observers only, in a direct run.complete.
RUN_PUBLIC_FIELDS = frozenset({
    "run_id", "mode", "device", "hops", "hops_trained", "outcomes", "bytes_provisioned", "transfer_s", "train_s",
    "eval_s", "transfer_share", "provision_gbps", "last_epoch", "skipped",
})


@message("run.complete", senders=ORCH, broadcast=True)
@dataclass(frozen=True)
class RunComplete:
    """The schedule is done; broadcast, ``summary`` holds :data:`RUN_PUBLIC_FIELDS`; sent to an observer, the whole table."""

    summary: dict[str, Any]


@message("run.receipt", senders=ORCH)
@dataclass(frozen=True)
class RunReceipt:
    """Sent to one holder at the run's end: its own trained hops, as a document signed on its own
    (gtbus.provenance.receipt), which the holder checks and keeps."""

    receipt: dict[str, Any]


@message("shutdown", senders=ORCH, broadcast=True)
@dataclass(frozen=True)
class Shutdown:
    """Nodes should exit after finishing in-flight work."""

    reason: str


# --- remote holders: ship-to-device through the device agent ----------------------------------


@message("agent.stage", senders=ORCH, fenced=True)
@dataclass(frozen=True)
class AgentStage:
    """The orchestrator lets its device agent write this hop's staging for one remote holder.

    ``sealed_handle`` (the staging capability) opens only with the agent's
    X25519 key; the agent never sees the channel key, only ciphertext.
    """

    token_id: str
    holder: str
    sealed_handle: bytes
    staging_bytes: int
    segment_size: int


@message("agent.ready", senders={Role.AGENT}, fenced=True)
@dataclass(frozen=True)
class AgentReady:
    """The agent mapped the hop's staging and accepts the holder's segments."""

    token_id: str


@message("agent.done", senders=HOLDER, fenced=True)
@dataclass(frozen=True)
class AgentDone:
    """A remote holder has streamed all its segments to the agent."""

    token_id: str
    segments: int
    nbytes: int


@message("agent.written", senders={Role.AGENT}, fenced=True)
@dataclass(frozen=True)
class AgentWritten:
    """The agent wrote every segment into device staging and unmapped it."""

    token_id: str
    segments: int
    nbytes: int
