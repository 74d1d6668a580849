"""The data holder node: registers its dataset, and when the token comes, writes one chunk.

On a grant the holder checks (beyond what the receive pipeline checked: the
orchestrator's signature, recipient, freshness, epoch fence):

* the grant is for a new epoch and its lease is still running
  (:class:`~gtbus.protocol.holder_hop.HolderMachine`);
* the sealed channel params open with its own X25519 key;
* the signed measurement report verifies under the pinned platform key, its
  code hash is the pinned one, and it commits to exactly the channel key just
  opened, for this run and epoch: the device that will decrypt is the measured one;
* the orchestrator's evidence was appraised: at registration the holder sends a
  fresh nonce (attest.request), and its :class:`~gtbus.attest.appraiser.Appraiser`
  checks the evidence that comes back against the holder's policy (pinned
  measurements, versions, roots, revocation). No grant is acked before that.

Only then does it map the hop's staging buffer, seal its chunk into it
segment by segment (plaintext never leaves this process except as AEAD
ciphertext), unmap, and return the token with the segment count, a digest,
and its commitment to the chunk (:mod:`gtbus.provenance.commitment`: keyed by
a secret only this holder has, so the manifest that lists it reveals nothing).

When the run completes, the orchestrator sends it a receipt of its own hops;
the holder checks every value (:func:`gtbus.provenance.receipt.accept_receipt`)
and keeps it in its receipts folder, or refuses it with one line and keeps nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy

from gtbus.attest import NONCE_SIZE, Evidence
from gtbus.attest.appraiser import Appraiser
from gtbus.errors import ChannelError, DeviceError, GtbusError
from gtbus.gpu.attestation import AttestationError, ReportVerifier, SignedReport
from gtbus.gpu.channel import ChannelParams, SegmentContext, segment_count
from gtbus.gpu.device import HolderStaging
from gtbus.gpu.sealing import open_params
from gtbus.messages.pipeline import Accepted
from gtbus.messages.types import (
    AgentDone,
    Heartbeat,
    AgentWritten,
    AttestEvidence,
    AttestRequest,
    HopPrepare,
    HopReport,
    Refusal,
    RunComplete,
    RunReceipt,
    Shutdown,
    TokenAck,
    TokenDecline,
    TokenGrant,
    TokenReturn,
    TokenRevoke,
    Welcome,
)
from gtbus.nodes.faults import HolderFaults
from gtbus.nodes.holder_prepare import PreparedStaging, open_prepared
from gtbus.nodes.hop_phases import HOLDER_PHASES, PhaseClock, describe
from gtbus.nodes.registration import register_with
from gtbus.nodes.runtime import NodeRuntime
from gtbus.nodes.ship_sender import stream_segments
from gtbus.private_files import private_dir
from gtbus.provenance.commitment import CommitmentOf, chunk_commitment, commitment_key, dataset_commitments
from gtbus.provenance.document import ProvenanceError, read_document, write_document
from gtbus.provenance.receipt import accept_receipt
from gtbus.protocol.holder_hop import (
    Granted,
    HolderMachine,
    HolderStep,
    Provision,
    Refused,
    Revoked,
    SendAck,
    SendDecline,
    SendReturn,
    StopWriting,
    Written,
)
from gtbus.training.shards import Dataset
from gtbus.transport.base import Delivery

_Summary = tuple[int, int, bytes, bytes]  # segments, bytes, ciphertext digest the holder wrote, its chunk commitment

#: Seconds a holder whose run completed waits for its receipt before it exits (the run never waits for it).
RECEIPT_WAIT_S = 5.0
#: A travel hop of at most this many plaintext bytes is mapped, sealed and unmapped on the event loop's
#: thread, not a worker: on the H200 host the handoff to a worker thread and back cost about 0.3 ms
#: (scratch probe: map + seal + copy + unmap of 128 bytes 0.18 ms inline, 0.47 ms through a worker),
#: while sealing 64 KiB on one core takes well under 0.1 ms, so the loop is held no longer than a
#: message's verification holds it.
INLINE_WRITE_BYTES = 64 << 10


class Holder:
    """A data holder: its dataset, its keys, and the hop shell around :class:`HolderMachine`."""

    def __init__(
        self,
        runtime: NodeRuntime,
        dataset: Dataset,
        device_cls: type[HolderStaging],
        verifier: ReportVerifier,
        *,
        chunk_tokens: int | None = None,
        faults: HolderFaults | None = None,
        orchestrator_timeout: float = 120.0,
        on_event: Callable[[str], None] | None = None,
        agent: NodeRuntime | None = None,
        appraiser: Appraiser | None = None,
        receipts_dir: Path | None = None,
    ) -> None:
        self.rt = runtime
        # Where accepted receipts are kept (default: RUN_DIR/receipts/NAME), one file per run.
        self.receipts_dir = receipts_dir or runtime.run_dir / "receipts" / runtime.name
        self.receipt: Path | None = None  # the receipt stored for this run
        self._receipt_settled = asyncio.Event()  # a receipt came and was stored or refused
        self._completed = False  # the run completed (not merely shut down): a receipt is on its way
        self.rounds = 1
        # A holder on another server than the GPU writes through the device agent there.
        self.agent = agent
        self.dataset = dataset
        self.device_cls = device_cls
        self.verifier = verifier
        # The orchestrator's evidence is appraised with this at each registration (None: only the per-grant reports).
        self.appraiser = appraiser
        self._appraised = asyncio.Event()  # set once the appraisal is settled (passed, or failed: _appraisal_error)
        self._appraisal_error: str | None = None
        if appraiser is None:
            self._appraised.set()
        # The run's chunk size, announced in the Welcome; a value given here is only
        # what this holder expects (registration fails with one line if the run differs).
        self.expected_chunk_tokens = chunk_tokens
        self.chunk_tokens = chunk_tokens or 0
        self.orchestrator_timeout = orchestrator_timeout
        self._prepared = asyncio.Event()
        self.faults = faults or HolderFaults()
        self.staging = self.faults.around(device_cls)  # the device class, or the drills around its staging writes
        self.on_event = on_event or (lambda line: None)
        self.machine = HolderMachine()
        self.log = logging.getLogger(f"gtbus.holder.{runtime.name}")
        self.run_id: str | None = None
        self._server_session: bytes | None = None
        self._reregistering: asyncio.Task[Welcome] | None = None
        self.done = asyncio.Event()
        self.hops_provisioned = 0
        self.refused: list[str] = []
        self._task: asyncio.Task[None] | None = None
        # Chunk commitments of the run, hashed ahead while this holder waits for its grants,
        # so a hop never hashes its chunk a second time beside the sealing: (run id, chunk) -> commitment.
        self._commitments: dict[tuple[str, int], bytes] = {}
        self._precommitting: asyncio.Task[None] | None = None
        self._clock = PhaseClock(HOLDER_PHASES)  # the current hop's phase marks, from its grant's arrival
        self._next_hop: PreparedStaging | None = None  # params opened and staging mapped before their grant
        self._hop_was_prepared = False  # the current hop's
        self._deferred_prepare: HopPrepare | None = None  # came while a hop was being written: opened as it ends
        self._early_chunk: tuple[int, asyncio.Future[memoryview]] | None = None  # the prepared hop's chunk, being read
        runtime.on(TokenGrant, self._on_grant)
        runtime.on(HopPrepare, self._on_prepare)
        runtime.on(Heartbeat, self._on_server_heartbeat)
        runtime.on(TokenRevoke, self._on_revoke)
        runtime.on(RunComplete, self._on_complete)
        runtime.on(Shutdown, self._on_complete)
        runtime.on(HopReport, self._on_hop_report)
        runtime.on(RunReceipt, self._on_receipt)

    async def register(self, *, attempts: int = 30, timeout: float = 2.0) -> Welcome:
        """Register the dataset manifest; verify the orchestrator's measurement (retries while it starts)."""
        manifest = self.dataset.manifest()
        if self.agent is not None:
            manifest["via"] = self.agent.server
        acc = await register_with(self.rt, manifest, attempts=attempts, timeout=timeout)
        welcome: Welcome = acc.message
        self.verifier.verify(SignedReport.from_wire(welcome.report), run_id=welcome.run_id)
        self.chunk_tokens = self._run_chunk_tokens(welcome)
        rounds = welcome.schedule.get("rounds")
        self.rounds = rounds if type(rounds) is int and 1 <= rounds <= 1 << 20 else 1
        self.run_id = welcome.run_id
        self._server_session = acc.header.session
        if self._precommitting is None or self._precommitting.done():
            self._precommitting = asyncio.create_task(self._precommit(welcome.run_id))
        self.on_event(f"{self.rt.name}: registered with run {welcome.run_id}; measurement verified")
        if self.appraiser is not None:
            self._appraised.clear()
            self._appraisal_error = None
            try:
                await self._appraise_orchestrator(welcome.run_id, attempts=attempts, timeout=timeout)
            except Exception as exc:
                self._appraisal_error = str(exc)  # grants waiting on the appraisal are declined with it
                raise
            finally:
                self._appraised.set()  # settled: appraised, or failed with _appraisal_error
        return welcome

    async def _appraise_orchestrator(self, run_id: str, *, attempts: int, timeout: float) -> None:
        """Ask for the orchestrator's evidence with a fresh nonce and appraise it; AttestationError (one line) if refused."""
        assert self.appraiser is not None
        kind = self.appraiser.policy.kind
        for _ in range(attempts):
            nonce = os.urandom(NONCE_SIZE)  # fresh per try: an answer to an earlier try is not taken
            try:
                acc = await self.rt.request(AttestRequest(nonce, kind), timeout=timeout)
            except asyncio.TimeoutError:
                continue
            m = acc.message
            if isinstance(m, Refusal):
                raise AttestationError(f"the orchestrator gave no {kind} evidence: {m.reason}")
            if not isinstance(m, AttestEvidence):
                raise AttestationError(f"the orchestrator answered the evidence request with {acc.spec.name}")
            try:
                claims = self.appraiser.appraise(Evidence.from_wire(m.evidence), nonce, run_id, time.time())
            except AttestationError as exc:
                raise AttestationError(f"the orchestrator's {kind} evidence is refused: {exc}") from None
            names = ", ".join(f"{k} {v.hex()[:16]}" for k, v in sorted(claims.measurements.items()))
            self.on_event(f"{self.rt.name}: the orchestrator's {kind} evidence appraised ({names})")
            return
        raise AttestationError(f"the orchestrator did not answer the evidence request ({attempts} tries of {timeout:g}s)")

    def _run_chunk_tokens(self, welcome: Welcome) -> int:
        value = welcome.schedule.get("chunk_tokens")
        if type(value) is not int or not 1 <= value <= 1 << 31:
            raise GtbusError(f"{self.rt.name}: the orchestrator announced no usable chunk size ({type(value).__name__})")
        if self.expected_chunk_tokens is not None and value != self.expected_chunk_tokens:
            raise GtbusError(
                f"{self.rt.name}: this run uses chunks of {value} tokens, not --chunk-tokens {self.expected_chunk_tokens}; "
                "drop the option to take the run's"
            )
        if self.chunk_tokens and value != self.chunk_tokens:
            raise GtbusError(f"{self.rt.name}: the orchestrator came back with chunks of {value} tokens, not {self.chunk_tokens}; start a new run")
        return value

    async def _on_server_heartbeat(self, acc: Accepted[Heartbeat], delivery: Delivery) -> None:
        # A newer session of the orchestrator is a restarted process (resume after a
        # crash): it knows nothing of us until we register again.
        if acc.header.sender != self.rt.server or self._server_session is None or acc.header.session <= self._server_session:
            return
        if self._reregistering is None or self._reregistering.done():
            self._server_session = acc.header.session
            self.on_event(f"{self.rt.name}: the orchestrator restarted; registering again")
            self._reregistering = asyncio.create_task(self.register())

    async def _on_complete(self, acc: Accepted[RunComplete | Shutdown], delivery: Delivery) -> None:
        if isinstance(acc.message, RunComplete):
            self._completed = True
        self.done.set()

    def _commitment(self, plain: memoryview | bytes, run_id: str) -> bytes:
        """This holder's commitment to a chunk of run ``run_id`` (its key never leaves this process)."""
        return chunk_commitment(commitment_key(bytes(self.rt.identity.signing_key), run_id), plain)

    def _commitment_of(self, run_id: str) -> CommitmentOf:
        """Commitments to this holder's chunks of ``run_id``: the ones hashed ahead, the others from its data now."""
        of = dataset_commitments(self.dataset, self.chunk_tokens, bytes(self.rt.identity.signing_key), run_id)
        return lambda index: self._commitments.get((run_id, index)) or of(index)

    async def _precommit(self, run_id: str) -> None:
        # One chunk at a time on a worker thread (BLAKE3 releases the GIL): the loop keeps serving.
        of = self._commitment_of(run_id)
        for index in range(self.dataset.chunk_count(self.chunk_tokens)):
            c = await asyncio.to_thread(of, index)
            if c is not None:
                self._commitments[(run_id, index)] = c

    async def _on_receipt(self, acc: Accepted[RunReceipt], delivery: Delivery) -> None:
        if acc.header.sender != self.rt.server or self.run_id is None:
            self.log.info("ignored a receipt before registering")
            return
        try:
            server = self.rt.roster[self.rt.server]
            max_hops = self.dataset.chunk_count(self.chunk_tokens) * self.rounds
            r = await asyncio.to_thread(
                accept_receipt, acc.message.receipt, holder=self.rt.name, run_id=self.run_id,
                orchestrator_key=server.ed25519, max_hops=max_hops,
                commitment_of=self._commitment_of(self.run_id),
            )
            path = self.receipts_dir / f"{r.run_id}.json"
            private_dir(self.receipts_dir)
            # The first receipt of a run is kept: a later, different one cannot replace the holder's evidence.
            if os.path.lexists(path) and read_document(path) != r.doc:
                raise ProvenanceError(f"a different receipt of run {r.run_id} is already stored in {path}; keeping that one")
            write_document(path, r.doc, mode=0o600)
        except (ProvenanceError, GtbusError) as exc:
            self.log.error("refused the receipt: %s", exc)
            self.on_event(f"{self.rt.name}: refused the orchestrator's receipt: {exc}")
            self._receipt_settled.set()
            return
        self.receipt = path
        self.on_event(f"{self.rt.name}: receipt of run {r.run_id} checked and stored in {path} ({len(r.hops)} trained hops of its chunks)")
        self._receipt_settled.set()

    async def _on_hop_report(self, acc: Accepted[HopReport], delivery: Delivery) -> None:
        # Only ever our own hop's (the orchestrator sends no one else's); a stray one is ignored.
        r: HopReport = acc.message
        if r.holder != self.rt.name or acc.header.sender != self.rt.server:
            return
        before, after = r.record.get("eval_before"), r.record.get("eval_after")
        loss = f", loss {before:.3f} -> {after:.3f}" if isinstance(before, float) and isinstance(after, float) else ""
        self.on_event(f"{self.rt.name}: hop {r.epoch} (chunk {r.chunk_index}): {r.outcome}{loss}")

    async def _on_revoke(self, acc: Accepted[TokenRevoke], delivery: Delivery) -> None:
        step = self.machine.handle(Revoked(acc.message.token_id, acc.header.epoch))
        if step.counted:
            self.on_event(f"{self.rt.name}: hop {acc.header.epoch} revoked: {acc.message.reason}")
        await self._perform(step)

    async def _on_prepare(self, acc: Accepted[HopPrepare], delivery: Delivery) -> None:
        p: HopPrepare = acc.message
        self._drop_next_hop()  # one at a time: the newest guess is the one that counts
        self._deferred_prepare = None
        if p.holder != self.rt.name or acc.header.sender != self.rt.server:
            why = f"it names holder {p.holder[:40]!r}" if p.holder != self.rt.name else f"it comes from {acc.header.sender}, not the orchestrator"
        elif self.run_id is None or p.run_id != self.run_id:
            why = f"it is for run {p.run_id[:40]!r}, registered with run {self.run_id}"
        elif self.agent is not None or self.faults.writes:
            return  # written through a device agent, or by a drill: the grant maps as it comes
        elif not self._prepared.is_set() or (self._task is not None and not self._task.done()):
            # Still setting up its device (the run's first hops come right after registering), or
            # writing a hop now (one holder's hops back to back: mapping beside it would sit on that
            # hop's path): opened once set up, or as the hop ends, long before the next grant.
            self._deferred_prepare = p
            return
        else:
            self._open_prepared(p)
            return
        self.log.warning("ignored the preparation of chunk %d: %s", p.chunk_index, why)

    def _open_prepared(self, p: HopPrepare) -> None:
        try:
            self._next_hop = open_prepared(p.sealed_params, bytes(self.rt.identity.x25519_secret), self.staging)
        except (ChannelError, DeviceError, GtbusError) as exc:
            self.log.warning("ignored the preparation of chunk %d: %s", p.chunk_index, exc)
            return
        # The chunk it names, read on another thread while this holder waits (the grant checks the index again).
        reading = asyncio.get_running_loop().run_in_executor(None, self._read_chunk, p.chunk_index)
        reading.add_done_callback(lambda f: f.cancelled() or f.exception())  # a bad index is the grant's to report, if one comes
        self._early_chunk = (p.chunk_index, reading)

    def _read_chunk(self, index: int) -> memoryview:
        """Chunk ``index`` as contiguous little-endian uint16 bytes (IndexError naming the range if there is none)."""
        return memoryview(numpy.ascontiguousarray(self.dataset.chunk(index, self.chunk_tokens), dtype="<u2")).cast("B")

    async def _chunk_bytes(self, index: int) -> memoryview:
        """Chunk ``index``: read ahead by the hop's preparation if it named this chunk, else now."""
        early, self._early_chunk = self._early_chunk, None
        if early is not None and early[0] == index:
            try:
                return await early[1]
            except Exception:  # noqa: BLE001 - read again below, where the error is reported as the hop's
                pass
        return self._read_chunk(index)

    def _drop_next_hop(self) -> None:
        nxt, self._next_hop = self._next_hop, None
        if nxt is not None:
            # Its chunk read goes with it; once a grant has taken the preparation, the read is that hop's.
            self._early_chunk = None
            self.staging.unmap(nxt.mapping)

    async def _on_grant(self, acc: Accepted[TokenGrant], delivery: Delivery) -> None:
        g: TokenGrant = acc.message
        if g.holder != self.rt.name:
            return
        clock = PhaseClock(HOLDER_PHASES)
        step = self.machine.handle(Granted(g.token_id, acc.header.epoch, g.lease_deadline, time.time()))
        if not step.counted:
            self.log.info("ignored grant: %s", step.reason)
        else:
            self._clock = clock
        await self._perform(step, g)

    async def _perform(self, step: HolderStep, grant: TokenGrant | None = None, summary: _Summary | None = None) -> None:
        """Execute the machine's actions, in order (``grant`` and ``summary`` are the hop's, where an action needs them)."""
        for action in step.actions:
            await self._ACTIONS[type(action)](self, action, grant, summary)

    async def _send_ack(self, a: SendAck, grant: TokenGrant | None, summary: _Summary | None) -> None:
        await self.rt.send(TokenAck(a.token_id), epoch=a.epoch)

    async def _send_decline(self, a: SendDecline, grant: TokenGrant | None, summary: _Summary | None) -> None:
        reason = self.faults.decline_reason(a.reason) or a.reason  # a drill may decline with its own words
        await self.rt.send(TokenDecline(a.token_id, reason[:200]), epoch=a.epoch)

    async def _stop_writing(self, a: StopWriting, grant: TokenGrant | None, summary: _Summary | None) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _send_return(self, a: SendReturn, grant: TokenGrant | None, summary: _Summary | None) -> None:
        assert grant is not None and summary is not None
        self.faults.before_return()
        await self.rt.send(TokenReturn(a.token_id, grant.chunk_index, *summary), epoch=a.epoch)
        self._clock.mark("return_sent")
        self.hops_provisioned += 1
        self._prefetch_soon(grant.chunk_index + 1)
        # Where the hop's time went on this side, for a person (and `gtbus bench device`) to read.
        ahead = "; params and staging were prepared ahead" if self._hop_was_prepared else ""
        self.on_event(f"{self.rt.name}: hop {a.epoch} chunk {grant.chunk_index}: wrote {summary[1]} bytes in {summary[0]} segments"
                      f" (ms from the grant: {describe(self._clock.marks)}){ahead}")

    async def _start_provision(self, a: Provision, grant: TokenGrant | None, summary: _Summary | None) -> None:
        """Check the grant (sealed params open, measurement verifies, same run); ack; write in a task."""
        assert grant is not None
        epoch = a.epoch
        drill = self.faults.decline_reason(None)
        if drill is not None:
            await self._perform(self.machine.handle(Refused(a.token_id, epoch, drill)))
            return
        clock = self._clock
        if self._deferred_prepare is not None and self._deferred_prepare.sealed_params == grant.sealed_params:
            self._deferred_prepare = None  # its grant came first: the grant maps as it comes
        nxt, self._next_hop = self._next_hop, None
        if nxt is not None and not nxt.matches(grant.sealed_params):
            self.staging.unmap(nxt.mapping)  # a guess for another hop: this grant maps its own
            nxt = None
        warm = nxt.mapping if nxt is not None else None
        self._hop_was_prepared = nxt is not None
        try:
            params = nxt.params if nxt is not None else open_params(grant.sealed_params, bytes(self.rt.identity.x25519_secret))
            clock.mark("params_opened")
            self.verifier.verify(SignedReport.from_wire(grant.report), channel_key=params.key, run_id=grant.run_id, epoch=epoch)
            clock.mark("report_verified")
            if self.run_id is not None and grant.run_id != self.run_id:
                raise AttestationError(f"grant for run {grant.run_id}, registered with run {self.run_id}")
        except (ChannelError, AttestationError, GtbusError) as exc:
            if warm is not None:
                self.staging.unmap(warm)
            self.refused.append(str(exc))
            self.log.error("refused grant %d: %s", epoch, exc)
            await self._perform(self.machine.handle(Refused(a.token_id, epoch, f"refused: {exc}")))
            return
        if not self._appraised.is_set() or self._appraisal_error is not None:
            # A grant that overtook our evidence request (the last holder to register can
            # be granted at once): wait in a task, the receive loop must stay free to get the evidence.
            self._task = asyncio.create_task(self._ack_when_appraised(a, grant, params, clock, warm))
            return
        await self._ack_and_provision(a, grant, params, clock, warm)

    async def _ack_and_provision(self, a: Provision, grant: TokenGrant, params: ChannelParams, clock: PhaseClock, warm: Any) -> None:
        """Ack, then write in a task (``warm``: the staging already mapped by the hop's preparation, or None)."""
        await self.rt.send(TokenAck(a.token_id), epoch=a.epoch)
        clock.mark("ack_sent")
        # Provision in a task so a revoke can cancel it while we keep receiving.
        self._task = asyncio.create_task(self._provision(grant, a.epoch, params, clock, warm))

    async def _ack_when_appraised(self, a: Provision, grant: TokenGrant, params: ChannelParams, clock: PhaseClock, warm: Any) -> None:
        try:
            await asyncio.wait_for(self._appraised.wait(), max(0.0, grant.lease_deadline - time.time()))
            why = self._appraisal_error
        except asyncio.TimeoutError:
            why = "the orchestrator's evidence is not appraised"
        if why is not None:
            if warm is not None:
                self.staging.unmap(warm)
            self.refused.append(why)
            await self._perform(self.machine.handle(Refused(a.token_id, a.epoch, f"refused: {why}")))
            return
        await self._ack_and_provision(a, grant, params, clock, warm)

    async def _provision(self, g: TokenGrant, epoch: int, params: ChannelParams, clock: PhaseClock, warm: Any = None) -> None:
        """Write the hop (in its task); then open the next hop's preparation if it came meanwhile."""
        try:
            await self._write_hop(g, epoch, params, clock, warm)
        finally:
            self._open_deferred_prepare()

    def _open_deferred_prepare(self) -> None:
        p, self._deferred_prepare = self._deferred_prepare, None
        if p is not None:
            self._open_prepared(p)

    async def _write_hop(self, g: TokenGrant, epoch: int, params: ChannelParams, clock: PhaseClock, warm: Any) -> None:
        mapping = None
        try:
            await self._prepared.wait()
            plain = await self._chunk_bytes(g.chunk_index)
            clock.mark("chunk_read")
            count = segment_count(len(plain), params.segment_size)
            ctx = SegmentContext(g.run_id, epoch, self.rt.name, count)
            # Hashed ahead while waiting for the grant; if not yet, on another thread while the chunk is sealed.
            known = self._commitments.get((g.run_id, g.chunk_index))
            committing = asyncio.ensure_future(asyncio.to_thread(self._commitment, plain, g.run_id)) if known is None else None
            await self.faults.after_ack()
            try:
                local = g.mode == "travel" and self.agent is None
                handed, warm = warm, None  # the writer owns the prepared mapping from here
                if handed is not None and not local:  # prepared for a hop not written here: nothing uses it
                    self.staging.unmap(handed)
                    handed = None
                if g.mode == "travel" and self.agent is not None:
                    written = await self._write_ship(g, epoch, params, plain, ctx, via=self.agent)
                elif local and len(plain) <= INLINE_WRITE_BYTES:
                    written, mapping = self._write_travel(params, plain, ctx, clock, handed)
                elif local:
                    written, mapping = await asyncio.to_thread(self._write_travel, params, plain, ctx, clock, handed)
                else:
                    written = await self._write_ship(g, epoch, params, plain, ctx)
            finally:
                commitment = known if committing is None else await committing
            summary = (*written, commitment)
        except (ChannelError, DeviceError, GtbusError, IndexError) as exc:
            self.refused.append(str(exc))
            self.log.error("hop %d failed: %s", epoch, exc)
            if warm is not None:  # failed before the writer took it
                self.staging.unmap(warm)
            await self._perform(self.machine.handle(Refused(g.token_id, epoch, f"provisioning failed: {exc}")))
            return
        except BaseException:  # revoked (cancelled) before the writer took it
            if warm is not None:
                self.staging.unmap(warm)
            raise
        try:
            # Revoked while writing: the machine ignores it and nothing is returned.
            await self._perform(self.machine.handle(Written(g.token_id, epoch)), g, summary)
        finally:
            if mapping is not None and len(plain) <= INLINE_WRITE_BYTES:
                self._unmap(mapping, clock)
            elif mapping is not None:
                # Unmapped once the return is on its way, not before: closing a CUDA IPC
                # mapping of 512 MiB took 1.25 ms on the H200 host, on the hop's critical path.
                await asyncio.to_thread(self._unmap, mapping, clock)

    _ACTIONS: dict[type, Callable[..., Awaitable[None]]] = {
        Provision: _start_provision,
        SendAck: _send_ack,
        SendDecline: _send_decline,
        SendReturn: _send_return,
        StopWriting: _stop_writing,
    }

    def _write_travel(self, params: ChannelParams, plain: memoryview, ctx: SegmentContext, clock: PhaseClock,
                      warm: Any = None) -> tuple[tuple[int, int, bytes], Any]:
        """Seal into the hop's staging (``warm``: mapped by its preparation); returns the summary and the mapping, still open
        (the caller unmaps after the return)."""
        mapping = warm if warm is not None else self.staging.map_staging(params.buffer_handle)
        clock.mark("map")
        try:
            s = mapping.seal_into(plain, params, ctx)
        except BaseException:
            self._unmap(mapping, clock)
            raise
        clock.mark("seal")
        return (s.count, s.nbytes, s.ciphertext_digest), mapping

    def _unmap(self, mapping: Any, clock: PhaseClock) -> None:
        self.staging.unmap(mapping)
        clock.mark("unmap")

    async def _write_ship(
        self, g: TokenGrant, epoch: int, params: ChannelParams, plain: memoryview, ctx: SegmentContext, via: NodeRuntime | None = None
    ) -> tuple[int, int, bytes]:
        """Seal and stream the segments (ship_sender): to the orchestrator (ship) or the device agent (remote travel)."""
        current = lambda: self.machine.is_current(g.token_id, epoch)  # noqa: E731
        s = await stream_segments(via or self.rt, g.token_id, epoch, params, plain, ctx, current)
        # Revoked while streaming: the caller sends nothing more for this hop, and the
        # agent's stage may already be another hop's (no AgentDone to wait out).
        if via is not None and current():
            wait = max(5.0, g.lease_deadline - time.time())
            try:
                acc = await via.request(AgentDone(g.token_id, s.count, s.nbytes), timeout=wait, epoch=epoch)
            except asyncio.TimeoutError:
                # Cut off from the agent (partition): end this hop like any other failure.
                raise GtbusError(f"device agent {via.server} did not confirm the segments within {wait:.0f}s") from None
            if not isinstance(acc.message, AgentWritten):
                raise GtbusError(f"device agent did not take the segments: {getattr(acc.message, 'reason', acc.spec.name)}")
        return s.count, s.nbytes, s.ciphertext_digest

    def _prefetch(self, index: int) -> None:
        # Touch every page of the chunk we expect to be asked for next, so the hop
        # reads it from memory rather than faulting it in while the token waits.
        if 0 <= index < self.dataset.chunk_count(self.chunk_tokens):
            chunk = self.dataset.chunk(index, self.chunk_tokens)
            int(numpy.add.reduce(chunk[::2048], dtype=numpy.uint64))

    def _prefetch_soon(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        loop.run_in_executor(None, self._prefetch, index)

    async def run(self) -> None:
        """Register, prepare the device side once, then serve grants until the run completes.

        GtbusError if the orchestrator says nothing (no heartbeat, no message) for
        ``orchestrator_timeout`` seconds: a holder does not wait forever for a run
        that is gone. (A restarted orchestrator is re-registered with as soon as
        its heartbeats arrive.)
        """
        # What is slow to set up (a CUDA context, the sealing threads, a pinned pool of
        # the expected size) is paid before registering: the first grant can follow
        # the Welcome at once. Only a pool larger than expected is made after it.
        prepared = (self.expected_chunk_tokens or 0) * 2
        if self.agent is None:
            await asyncio.to_thread(self.device_cls.prepare_holder, prepared)
        await self.register()
        if self.agent is None and self.chunk_tokens * 2 > prepared:
            await asyncio.to_thread(self.device_cls.prepare_holder, self.chunk_tokens * 2)
        self._prepared.set()
        if self._task is None or self._task.done():  # else the hop being written opens it as it ends
            self._open_deferred_prepare()
        self._prefetch_soon(0)
        self.rt.state_label = "registered"
        clock = self.rt.clock
        while not self.done.is_set():
            assert self.rt.server is not None
            last = self.rt.last_heard.get(self.rt.server, clock.monotonic())
            left = self.orchestrator_timeout - (clock.monotonic() - last)
            if left <= 0:
                raise GtbusError(f"{self.rt.name}: no word from the orchestrator for {self.orchestrator_timeout:.0f}s; giving up")
            try:
                await asyncio.wait_for(self.done.wait(), min(left, 1.0))
            except asyncio.TimeoutError:
                pass
        self._drop_next_hop()
        if self._completed and self.hops_provisioned:
            # The receipt is sent before the run's end is announced, on another socket: it may come just after.
            try:
                await asyncio.wait_for(self._receipt_settled.wait(), RECEIPT_WAIT_S)
            except asyncio.TimeoutError:
                self.on_event(f"{self.rt.name}: no receipt from the orchestrator within {RECEIPT_WAIT_S:g}s (the manifest can still be checked with --data)")
