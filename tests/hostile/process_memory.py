"""Reading a live process's memory high-water mark (the caps hostile tests state)."""

from __future__ import annotations

from pathlib import Path


def peak_rss_bytes(pid: int) -> int:
    """Peak resident set size (VmHWM) of a live process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")
