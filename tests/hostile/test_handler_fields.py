"""Every orchestrator handler, driven with random *field values* from an authenticated holder.

Not random bytes (tests/messages fuzzes the codec): well-signed messages of
every type a holder may send, whose fields are huge, negative, of the wrong
type, or sent in the wrong phase (no hop, someone else's hop, an old epoch).
In-process over the memory transport so hypothesis can try many schedules;
the same handlers run over real sockets in the other tests of this folder.

After every batch: no handler raised (the runtime logs a handler's exception
as an error), the token is idle or with the honest holder, no manifest was
admitted from a hostile value, and the orchestrator still answers.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted_holder import honest_manifest

from gtbus.gpu.attestation import PlatformSigner
from gtbus.gpu.host import HostDevice
from gtbus.messages.identity import Role
from gtbus.messages.registry import REGISTRY
from gtbus.messages.types import Echo, EchoReply, Register, TokenDecline, TokenGrant, Welcome
from gtbus.nodes.orchestrator import Orchestrator, RunConfig
from gtbus.nodes.runtime import NodeRuntime
from gtbus.testing import MemoryNetwork, make_deployment, run_async
from gtbus.training.bytelm import ByteLM, ByteLMConfig

#: Message types a holder may send (the registry says who may send what).
HOLDER_TYPES = sorted((s for s in REGISTRY.values() if Role.HOLDER in s.senders), key=lambda s: s.name)

HOSTILE_SCALARS = st.one_of(
    st.sampled_from([0, -1, 1, 2**31, 2**62, 2**63 - 1, -(2**63), 2**64 - 1, 1e308, float("nan"), float("-inf")]),
    st.integers(-(2**63), 2**64 - 1),
    st.text(max_size=40),
    st.binary(max_size=64),
    st.booleans(),
    st.none(),
)
HOSTILE_VALUES = st.recursive(
    HOSTILE_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def hostile_message(draw: Any) -> tuple[Any, int, list[bytes]]:
    """A holder-sendable message with each field either hostile or plausible, an epoch, and blobs."""
    spec = draw(st.sampled_from(HOLDER_TYPES))
    values = {}
    for f in fields(spec.cls):
        if spec.cls is Register and f.name == "manifest" and draw(st.booleans()):
            # A manifest that is mostly right, with one field swapped for a hostile value.
            m = honest_manifest(8192)
            m[draw(st.sampled_from(sorted(m) + ["via", "chunk_count", "extra"]))] = draw(HOSTILE_VALUES)
            values[f.name] = m
        else:
            values[f.name] = draw(HOSTILE_VALUES)
    epoch = draw(st.sampled_from([0, 1, 2, 3, 2**40, 2**63 - 1]))
    blobs = draw(st.lists(st.binary(max_size=64), max_size=spec.max_blobs))
    # Built without the class's own checks: a hostile peer does not run them.
    msg = object.__new__(spec.cls)
    for name, value in values.items():
        object.__setattr__(msg, name, value)
    return msg, epoch, blobs


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _deployment(tmp: Path) -> tuple[Orchestrator, NodeRuntime, NodeRuntime, list[Any]]:
    dep = make_deployment(tmp / "keys", holders=2)
    net = MemoryNetwork()
    rt = NodeRuntime(dep.orchestrator, dep.roster, net.server("orch"), run_dir=tmp, heartbeat_interval=0)
    cfg = RunConfig(run_dir=tmp, holders=["h1", "h2"], chunk_tokens=4096, lease=0.1, steps_per_hop=2, max_chunks=8, absent_timeout=5.0)
    orch = Orchestrator(rt, HostDevice(), ByteLM(ByteLMConfig(hidden=32, batch=8)), PlatformSigner.generate(), cfg)
    hostile, honest = (NodeRuntime(h, dep.roster, net.client(h.name, server="orch"), run_dir=tmp, server="orch", heartbeat_interval=0)
                       for h in dep.holders)
    grants: list[Any] = []

    async def on_grant(acc: Any, delivery: Any) -> None:
        grants.append(acc)

    honest.on(TokenGrant, on_grant)
    for r in (rt, hostile, honest):
        await r.start()
    return orch, hostile, honest, grants


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(before=st.lists(hostile_message(), max_size=12), during=st.lists(hostile_message(), max_size=12))
def test_random_field_values_in_every_phase_never_break_a_handler(tmp_path_factory: Any, before: list, during: list) -> None:
    tmp = tmp_path_factory.mktemp("fields")
    errors = _Errors()
    logging.getLogger("gtbus").addHandler(errors)

    async def scenario() -> None:
        orch, hostile, honest, grants = await _deployment(tmp)
        try:
            await orch.setup()
            # Phase 1: nobody registered, no hop. h1 sends its hostile batch.
            for msg, epoch, blobs in before:
                await hostile.send(msg, epoch=epoch, blobs=blobs)
            await asyncio.sleep(0)
            # Only a manifest that fits may have been admitted, and then only as checked plain values.
            for name, m in orch.manifests.items():
                assert 0 < m.total_tokens <= 8 * 4096 and 0 <= m.max_token < 256, (name, m)
            # Both register honestly now (h1 may already be in: then this is its same data again or refused).
            await hostile.request(Register(honest_manifest(4096), "t"), timeout=5)
            assert isinstance((await honest.request(Register(honest_manifest(4096), "t"), timeout=5)).message, Welcome)
            run = asyncio.create_task(orch.run())
            # Phase 2: the run is going; the hostile holder keeps sending, the honest one declines its grants.
            sent = False
            while not run.done():
                if not sent:
                    for msg, epoch, blobs in during:
                        await hostile.send(msg, epoch=epoch, blobs=blobs)
                    sent = True
                while grants:
                    acc = grants.pop(0)
                    await honest.send(TokenDecline(acc.message.token_id, "test"), epoch=acc.header.epoch)
                await asyncio.wait({run}, timeout=0.01)
            summary = run.result() if not run.exception() else None
            assert summary is not None or "reachable" in str(run.exception()), run.exception()
            # Still serving: an echo gets its answer.
            reply = await honest.request(Echo(b"ping", "alive"), timeout=5)
            assert isinstance(reply.message, EchoReply)
        finally:
            for r in (honest, hostile, orch.rt):
                await r.close()

    try:
        run_async(scenario(), timeout=60)
    finally:
        logging.getLogger("gtbus").removeHandler(errors)
    assert not [r for r in errors.records if "handler for" in r.getMessage()], [r.getMessage() for r in errors.records]
