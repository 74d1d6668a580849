"""The public surface of gtbus.training, and that it needs no torch."""

from __future__ import annotations

import subprocess
import sys

import gtbus.training


def test_every_public_name_resolves() -> None:
    for name in gtbus.training.__all__:
        assert getattr(gtbus.training, name) is not None, name


def test_imports_and_reports_missing_torch_without_torch() -> None:
    script = (
        "import sys, numpy\n"
        "sys.modules['torch'] = None  # as if torch were not installed\n"
        "import gtbus.training as t\n"
        "assert t.ByteLM(t.ByteLMConfig(hidden=8), numpy).step == 0\n"
        "try:\n"
        "    t.TorchTrainer(lambda: None, vocab=256).load(numpy)\n"
        "except t.WorkloadError as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "needs torch" in result.stdout
