"""Bad options and arguments end in one ``Error:`` line naming the problem, exit status 2, no usage page."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("holder", "--backend", "tpu"), "Invalid value for '--backend': 'tpu' is not one of 'host', 'cupy'"),
        (("nosuch",), "No such command 'nosuch'"),
        (("keygen",), "Missing argument 'NAME'"),
        (("bench", "device", "--sizes", "a,b"), "--sizes"),
    ],
)
def test_usage_errors_are_one_line(args: tuple[str, ...], needle: str) -> None:
    r = subprocess.run([sys.executable, "-m", "gtbus", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], r.stderr
    assert "Usage:" not in r.stderr and "Traceback" not in r.stderr


def test_help_still_works() -> None:
    r = subprocess.run([sys.executable, "-m", "gtbus", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Usage: " in r.stdout and "runbook" in r.stdout
