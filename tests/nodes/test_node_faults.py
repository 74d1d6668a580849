"""The orchestrator's failure injection: specs parsed in one line, and each fault does exactly what it names at its epoch."""

from __future__ import annotations

from types import SimpleNamespace

import numpy
import pytest

from gtbus.errors import ConfigError
from gtbus.gpu.code_measure import first_change, loaded_code
from gtbus.gpu.host import HostDevice
from gtbus.nodes.faults import orchestrator_fault_hook
from gtbus.protocol.token import TokenMachine
from gtbus.training.bytelm import ByteLM, ByteLMConfig


def _orchestrator_at(epoch: int) -> SimpleNamespace:
    trainer = ByteLM(ByteLMConfig(context=4, embed=3, hidden=5, batch=6))
    trainer.load(numpy)
    # What the hook reaches for: the token's epoch and the trainer.
    return SimpleNamespace(token=TokenMachine(last_epoch=epoch), trainer=trainer)


@pytest.mark.parametrize(("spec", "message"), [
    ("tamper-disk-at-epoch=3", "unknown orchestrator fault 'tamper-disk-at-epoch' (tamper-model-at-epoch=N or tamper-code-at-epoch=N)"),
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
