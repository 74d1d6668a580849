"""Failure injection: specs parsed in one line; each orchestrator fault acts at its epoch only; a holder's drills act through the staging wrapper on a real host device."""

from __future__ import annotations

from types import SimpleNamespace

import numpy
import pytest

from gtbus.errors import ChannelError, ConfigError, DeviceError, GtbusError
from gtbus.gpu.channel import ChannelParams, SegmentContext, segment_count, staging_size
from gtbus.gpu.code_measure import first_change, loaded_code
from gtbus.gpu.host import HostDevice
from gtbus.nodes.faults import FaultyStaging, HolderFaults, orchestrator_fault_hook
from gtbus.protocol.token import TokenMachine
from gtbus.training.bytelm import ByteLM, ByteLMConfig


def _orchestrator_at(epoch: int) -> SimpleNamespace:
    trainer = ByteLM(ByteLMConfig(context=4, embed=3, hidden=5, batch=6))
    trainer.load(numpy)
    # What the hook reaches for: the token's epoch and the trainer.
    return SimpleNamespace(token=TokenMachine(last_epoch=epoch), trainer=trainer)


@pytest.mark.parametrize(("spec", "message"), [
    ("tamper-disk-at-epoch=3", "unknown orchestrator fault 'tamper-disk-at-epoch' (tamper-model-at-epoch=N or tamper-model-after-epoch=N or tamper-code-at-epoch=N or fail-device-at-epoch=N)"),
    ("tamper-model-at-epoch=three", "tamper-model-at-epoch needs an epoch number, not 'three'"),
    ("tamper_code_at_epoch=", "tamper-code-at-epoch needs an epoch number, not ''"),
])
def test_a_bad_spec_is_one_line(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        orchestrator_fault_hook(spec)
    assert str(err.value) == message


def test_no_spec_no_hook() -> None:
    assert orchestrator_fault_hook("") is None


def test_the_model_fault_flips_one_bit_at_its_epoch_only() -> None:
    hook = orchestrator_fault_hook("tamper_model_at_epoch=4")
    assert hook is not None
    orch = _orchestrator_at(3)
    device = HostDevice()
    before = device.measure(*orch.trainer.parameter_views())
    hook(orch, None)
    assert device.measure(*orch.trainer.parameter_views()) == before
    orch.token.epoch = 4
    first = orch.trainer.parameter_views()[0].reshape(-1).view("uint8")
    byte = int(first[0])
    hook(orch, None)
    assert int(first[0]) == byte ^ 1 and device.measure(*orch.trainer.parameter_views()) != before


def test_the_between_hops_fault_fires_only_after_its_hop() -> None:
    hook = orchestrator_fault_hook("tamper-model-after-epoch=2")
    assert hook is not None
    orch = _orchestrator_at(2)
    device = HostDevice()
    before = device.measure(*orch.trainer.parameter_views())
    hook(orch, None, "during")  # hop 2 itself is left alone
    assert device.measure(*orch.trainer.parameter_views()) == before
    hook(orch, None, "after")
    assert device.measure(*orch.trainer.parameter_views()) != before


def test_the_code_fault_is_what_the_loaded_code_check_names() -> None:
    hook = orchestrator_fault_hook("tamper-code-at-epoch=2")
    assert hook is not None
    orch = _orchestrator_at(2)
    device = HostDevice()
    before = loaded_code(orch.trainer, device)
    original = ByteLM.evaluate.__code__
    try:
        hook(orch, None)
        assert first_change(before, loaded_code(orch.trainer, device)) == "gtbus.training.bytelm.ByteLM.evaluate"
    finally:
        ByteLM.evaluate.__code__ = original


# -- a holder's drills ------------------------------------------------------------------------------

PLAIN = memoryview(numpy.arange(3000, dtype="<u2")).cast("B")


def _hop(device: HostDevice, epoch: int) -> tuple[object, ChannelParams, SegmentContext]:
    size = staging_size(len(PLAIN), 4096)
    staging, handle = device.alloc_hop_staging(size)
    params = ChannelParams.generate(str(handle), len(PLAIN), segment_size=4096)
    return staging, params, SegmentContext("run", epoch, "h1", segment_count(len(PLAIN), 4096))


def _write(staging_cls: object, params: ChannelParams, ctx: SegmentContext) -> tuple[int, int, bytes]:
    # What the holder's travel write does, through whatever class it was given.
    mapping = staging_cls.map_staging(params.buffer_handle)  # type: ignore[attr-defined]
    try:
        s = mapping.seal_into(PLAIN, params, ctx)
        return s.count, s.nbytes, s.ciphertext_digest
    finally:
        staging_cls.unmap(mapping)  # type: ignore[attr-defined]


def _opens(device: HostDevice, staging: object, params: ChannelParams, ctx: SegmentContext) -> bool:
    # What the orchestrator does with a return: authenticate and decrypt into a private buffer.
    out = device.alloc(len(PLAIN))
    try:
        device.open_segments(staging, out, params, ctx, ctx.count, len(PLAIN))
        return bytes(device.as_array(out, numpy.uint8)) == bytes(PLAIN)
    except ChannelError:
        return False
    finally:
        device.release(out)


@pytest.mark.parametrize(("spec", "message"), [
    ("garbage,teleport", "unknown fault 'teleport'"),
    ("dump-to", "fault dump_to needs a value (dump_to=...)"),
])
def test_a_bad_holder_spec_is_one_line(spec: str, message: str) -> None:
    with pytest.raises(GtbusError) as err:
        HolderFaults.parse(spec)
    assert str(err.value) == message


def test_without_write_drills_the_device_class_is_used_as_it_is() -> None:
    faults = HolderFaults.parse("stall=0.5,decline-with=no thanks")
    assert faults.around(HostDevice) is HostDevice
    assert faults.decline_reason(None) == "no thanks" and HolderFaults().decline_reason(None) is None
    assert HolderFaults().decline_reason("lease too short") == "lease too short"


def test_garbage_is_written_instead_of_the_chunk() -> None:
    device = HostDevice()
    try:
        staging, params, ctx = _hop(device, 1)
        honest = _hop(device, 2)
        assert _write(HostDevice, honest[1], honest[2])[2] != b"\0" * 32 and _opens(device, *honest)
        cls = HolderFaults.parse("garbage").around(HostDevice)
        assert isinstance(cls, FaultyStaging)
        assert _write(cls, params, ctx) == (ctx.count, len(PLAIN), b"\0" * 32)  # a forged return
        assert not _opens(device, staging, params, ctx)
    finally:
        device.close()


def test_replay_and_dump_write_an_earlier_hops_ciphertext(tmp_path) -> None:
    device = HostDevice()
    try:
        dump = tmp_path / "dump"
        cls = HolderFaults.parse(f"replay-previous,dump-to={dump}").around(HostDevice)
        first, p1, c1 = _hop(device, 1)
        _write(cls, p1, c1)  # nothing to replay yet: sealed honestly, kept, and dumped
        assert _opens(device, first, p1, c1)
        hop1 = dump.read_bytes()
        assert len(hop1) == staging_size(len(PLAIN), 4096)
        second, p2, c2 = _hop(device, 2)
        _write(cls, p2, c2)
        assert dump.read_bytes() == hop1 and not _opens(device, second, p2, c2)  # hop 1's ciphertext, refused in hop 2
        third, p3, c3 = _hop(device, 3)
        _write(HolderFaults.parse(f"replay-from={dump}").around(HostDevice), p3, c3)
        assert not _opens(device, third, p3, c3)
        fourth, p4, c4 = _hop(device, 4)  # held: staging dropped unrevoked is withdrawn
        with pytest.raises(GtbusError, match="^replay_from: "):
            _write(HolderFaults.parse(f"replay-from={tmp_path / 'absent'}").around(HostDevice), p4, c4)
    finally:
        device.close()


def test_mapping_an_earlier_hops_staging_fails() -> None:
    device = HostDevice()
    try:
        cls = HolderFaults.parse("map-old").around(HostDevice)
        first, p1, c1 = _hop(device, 1)
        _write(cls, p1, c1)
        device.revoke_staging(first)
        second, p2, c2 = _hop(device, 2)
        with pytest.raises(DeviceError, match="revoked or never issued"):
            _write(cls, p2, c2)
    finally:
        device.close()
