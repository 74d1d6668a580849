"""Code measurement: over the documented list of what the device runs, and code swapped in memory is found."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import gtbus.gpu.kernels
from gtbus.errors import ConfigError
from gtbus.gpu.backends import BACKEND_NAMES, device_class, make_device
from gtbus.gpu.code_measure import DEVICE_MODULES, HOP_MODULES, code_measurement, first_change, loaded_code, measured_modules
from gtbus.gpu.host import HostDevice
from gtbus.training.bytelm import ByteLM, ByteLMConfig
from gtbus.training.trainer import TRAINER_NAMES
from gtbus.training.workloads import make_trainer

NOT_RUN_ON_DATA = {"gtbus.gpu.kernels.bench_kernels"}  # a command-line benchmark, never loaded by a node


def test_every_kernel_module_is_measured() -> None:
    # A kernel module added later must join the list (or be named here as never run on data).
    kernels = {f"gtbus.gpu.kernels.{m.name}" for m in pkgutil.iter_modules(gtbus.gpu.kernels.__path__)}
    assert kernels - NOT_RUN_ON_DATA <= set(DEVICE_MODULES)
    for name in (*DEVICE_MODULES, *HOP_MODULES):
        importlib.import_module(name)


def test_the_list_is_trainer_backend_device_code_and_hop_shell() -> None:
    trainer, device = ByteLM(ByteLMConfig()), HostDevice()
    names = [m.__name__ for m in measured_modules(trainer, device)]
    assert names[:2] == ["gtbus.training.bytelm", "gtbus.gpu.host"]
    assert names[2:] == [*DEVICE_MODULES, *HOP_MODULES]
    loaded = loaded_code(trainer, device)
    for module in names:
        assert any(k.startswith(f"{module}.") for k in loaded), module


def test_the_measurement_is_stable_and_depends_on_the_trainer() -> None:
    device = HostDevice()
    a = code_measurement(ByteLM(ByteLMConfig()), device)
    assert a == code_measurement(ByteLM(ByteLMConfig(seed=5)), HostDevice())  # code, not weights or device identity

    class OtherTrainer(ByteLM):
        def code_bytes(self) -> bytes:
            return super().code_bytes() + b"# one more line\n"

    assert code_measurement(OtherTrainer(ByteLMConfig()), device) != a


def test_code_swapped_in_memory_is_named() -> None:
    trainer, device = ByteLM(ByteLMConfig()), HostDevice()
    before = loaded_code(trainer, device)
    assert first_change(before, loaded_code(trainer, device)) is None
    fn = ByteLM.evaluate
    original = fn.__code__
    try:
        fn.__code__ = original.replace(co_consts=original.co_consts + ("tampered",))
        assert first_change(before, loaded_code(trainer, device)) == "gtbus.training.bytelm.ByteLM.evaluate"
    finally:
        fn.__code__ = original
    assert first_change(before, loaded_code(trainer, device)) is None
    assert first_change(before, {**before, "zz.new": b""}) == "zz.new"  # a function added is a change too


def test_backends_and_trainers_by_name() -> None:
    assert device_class("host") is HostDevice and isinstance(make_device("host"), HostDevice)
    assert isinstance(make_trainer("bytelm", seed=3), ByteLM) and "bytelm" in TRAINER_NAMES and "host" in BACKEND_NAMES
    with pytest.raises(ConfigError, match=r"^unknown backend 'tpu' \(host or cupy\)$"):
        device_class("tpu")
    with pytest.raises(ConfigError, match=r"^unknown trainer 'llama' \(built in: bytelm, gpt2\)$"):
        make_trainer("llama")
