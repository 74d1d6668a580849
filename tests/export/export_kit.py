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


def run_demo(run_dir: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``gtbus demo`` into ``run_dir`` with ``args``, as a user runs it; asserts it succeeded without a traceback."""
    p = gtbus("demo", "--run-dir", run_dir, *args, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    return p


def gtbus_here(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The same command through click's runner, in this process (no interpreter or torch start-up); shaped like a subprocess result."""
    from click.testing import CliRunner

    from gtbus.cli.main import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # a traceback the real command would have printed
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def one_error_line(p: subprocess.CompletedProcess[str]) -> str:
    """The single ``Error:`` line a refused command printed (asserting it failed, in one line, without a traceback)."""
    assert p.returncode != 0, p.stdout[-500:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), p.stderr[-2000:]
    return lines[0]
