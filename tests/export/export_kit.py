"""What the export tests share: the real command, and the demo run they read."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: 2 holders x 64 KiB of stdlib source, chunks of 16 KiB: 8 hops of 60 ByteLM steps (a few seconds of training).
DEMO_ARGS = ("--kib-per-holder", "64", "--rounds", "1", "--chunk-tokens", "16384", "--steps", "60", "--holders", "2")


@dataclass(frozen=True)
class DemoRun:
    """A finished demo run: its folder and what the command printed."""

    run_dir: Path
    stdout: str


def gtbus(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real command, in its own process."""
    return subprocess.run([sys.executable, "-m", "gtbus", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def one_error_line(p: subprocess.CompletedProcess[str]) -> str:
    """The single ``Error:`` line a refused command printed (asserting it failed, in one line, without a traceback)."""
    assert p.returncode != 0, p.stdout[-500:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), p.stderr[-2000:]
    return lines[0]
