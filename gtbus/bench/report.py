"""What every benchmark writes: the machine it ran on, tables, and the result files.

A result is kept twice under ``bench/results/``: ``<name>-<host>.md`` for people
(machine header, notes, tables) and ``<name>-<host>.json`` for scripts (the
same numbers, unrounded). The host part of the file name is the short hostname,
so results of different machines sit side by side instead of overwriting each
other. Load averages are recorded at start and end: numbers taken while other
work ran on the machine say so in their own header.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Goal", "Table", "Result", "machine_info", "host_tag", "latency_stats", "load_average"]


def host_tag() -> str:
    """The short hostname, plus the GPU model when one is seen, reduced to characters safe in a file name.

    Machines of different cards may share a hostname; results must not overwrite each other.
    """
    name = socket.gethostname().split(".")[0] or "host"
    gpu = _gpu_name()
    if gpu:
        model = next((w for w in gpu.replace("NVIDIA", "").split() if any(c.isdigit() for c in w)), gpu)
        name = f"{name}-{model}"
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _gpu_name() -> str | None:
    """The first CUDA device's name if cupy is installed and sees one; None otherwise."""
    try:
        import cupy  # type: ignore[import-not-found]

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # no cupy, no driver, no device: all mean "no GPU here"
        return None


def _git_commit() -> str | None:
    # A bench run from a copy of the tree (so that edits made meanwhile cannot
    # change the code under test) names the commit it was copied from.
    if os.environ.get("GTBUS_BENCH_COMMIT"):
        return os.environ["GTBUS_BENCH_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """Hostname, CPU, cores, memory, Python, libraries, GPU (if cupy sees one), load, commit."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "gpu": _gpu_name(),
        "load_at_start": load_average(),
        "gtbus_commit": _git_commit(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    versions = {}
    for mod in ("zmq", "cryptography", "numpy", "nacl", "blake3", "msgpack"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except ImportError:
                continue
        v = getattr(m, "__version__", None) or getattr(m, "pyzmq_version", lambda: None)()
        if v:
            versions[mod] = str(v)
    zmq_mod = sys.modules.get("zmq")
    if zmq_mod is not None:
        versions["libzmq"] = zmq_mod.zmq_version()
    info["libraries"] = versions
    return info


def latency_stats(samples_ns: Sequence[int]) -> dict[str, float]:
    """min / median / p90 / p99 / mean of round trips, in microseconds, and the count."""
    if not samples_ns:
        return {"n": 0, "min_us": 0.0, "median_us": 0.0, "p90_us": 0.0, "p99_us": 0.0, "mean_us": 0.0}
    s = sorted(samples_ns)
    n = len(s)

    def pct(p: float) -> float:
        # nearest rank: the smallest sample with at least a fraction p of them at or below it
        return s[min(n - 1, max(0, math.ceil(p * n) - 1))] / 1e3

    return {
        "n": n,
        "min_us": s[0] / 1e3,
        "median_us": statistics.median(s) / 1e3,
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "mean_us": statistics.fmean(s) / 1e3,
    }


@dataclass
class Table:
    """A titled table of already formatted cells (strings), kept with its raw rows for JSON."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: how many leading columns are text (left-aligned); the rest are numbers
    text_columns: int = 1

    def add(self, *cells: object) -> None:
        """Append a row; cells are turned into strings as given."""
        if len(cells) != len(self.columns):
            raise ValueError(f"row has {len(cells)} cells, table {self.title!r} has {len(self.columns)} columns")
        self.rows.append([str(c) for c in cells])

    def text(self) -> str:
        """Aligned plain text for a terminal (first column left, numbers right)."""
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c) for i, c in enumerate(self.columns)]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) if i < self.text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        out = [self.title, line(self.columns), line(["-" * w for w in widths])]
        out += [line(r) for r in self.rows]
        out += [f"  {n}" for n in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        """A GitHub markdown table under a level-3 heading, notes below."""
        out = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        out.append("|" + "|".join("---" if i < self.text_columns else "---:" for i in range(len(self.columns))) + "|")
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out)


@dataclass(frozen=True)
class Goal:
    """One goal of a benchmark, checked against what this run measured.

    ``measured`` and ``goal`` are in ``unit``; ``at_most`` says which side of the
    goal is good (a latency or a ratio to a baseline's time: at most; a rate or a
    speed-up: at least). ``met`` is computed, never passed in, so a result file
    cannot claim a goal its own numbers miss.
    """

    name: str
    measured: float
    goal: float
    unit: str
    at_most: bool = False

    @property
    def met(self) -> bool:
        """Whether the measured value is on the good side of the goal (NaN never meets)."""
        if math.isnan(self.measured):
            return False
        return self.measured <= self.goal if self.at_most else self.measured >= self.goal

    def to_json(self) -> dict[str, Any]:
        """``{name, measured, goal, unit, met}`` plus the direction, as result files keep it."""
        return {"name": self.name, "measured": self.measured, "goal": self.goal, "unit": self.unit,
                "met": self.met, "direction": "at most" if self.at_most else "at least"}

    def line(self) -> str:
        """``met``/``MISSED``, name, measured vs goal, for the terminal and the markdown page."""
        sign = "<=" if self.at_most else ">="
        return f"{'met' if self.met else 'MISSED'}: {self.name}: {_num(self.measured)} {self.unit} (goal {sign} {_num(self.goal)})"


def _num(x: float) -> str:
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.4g}"
    return f"{int(x):,}"


@dataclass
class Result:
    """One benchmark's output: header lines, tables, free text sections, and the raw numbers."""

    name: str
    title: str
    machine: dict[str, Any]
    header: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    sections: list[tuple[str, str]] = field(default_factory=list)  # (heading, preformatted text)
    data: dict[str, Any] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)

    def goal(self, name: str, measured: float, goal: float, unit: str, *, at_most: bool = False) -> Goal:
        """Record one goal of this run (see :class:`Goal`); returns it so callers can say whether it was met."""
        g = Goal(name, float(measured), float(goal), unit, at_most)
        self.goals.append(g)
        return g

    def finish(self) -> None:
        """Stamp the end time and load (call when measuring is over)."""
        self.machine["load_at_end"] = load_average()
        self.machine["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def _machine_lines(self) -> list[str]:
        m = self.machine
        gpu = m.get("gpu") or "none seen by cupy"
        libs = ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items())
        return [
            f"host {m['hostname']}: {m['cpu']}, {m['usable_cores']} usable cores of {m['cores']}, "
            f"{m.get('memory_gib', '?')} GiB; GPU: {gpu}",
            f"{m['python']} on {m['platform']}; {libs}",
            f"gtbus {m.get('gtbus_commit') or '?'}; started {m['started']}; load average (1/5/15 min) "
            f"at start {m.get('load_at_start')}, at end {m.get('load_at_end')}",
        ]

    def text(self) -> str:
        """Everything for the terminal."""
        parts = [self.title, *self._machine_lines(), *self.header, ""]
        for t in self.tables:
            parts += [t.text(), ""]
        for heading, body in self.sections:
            parts += [heading, body, ""]
        if self.goals:
            parts += ["Goals", *(g.line() for g in self.goals), ""]
        return "\n".join(parts).rstrip() + "\n"

    def markdown(self) -> str:
        """Everything as a markdown page."""
        parts = [f"# {self.title}", "", *(f"- {line}" for line in self._machine_lines())]
        if self.header:
            parts += ["", *self.header]
        for t in self.tables:
            parts += ["", t.markdown()]
        for heading, body in self.sections:
            parts += ["", f"### {heading}", "", "```", body.rstrip(), "```"]
        if self.goals:
            parts += ["", "### Goals", "", *(f"- {g.line()}" for g in self.goals)]
        return "\n".join(parts) + "\n"

    def to_json(self) -> dict[str, Any]:
        """Machine, header, tables (as cells) and the raw numbers."""
        return {
            "benchmark": self.name,
            "title": self.title,
            "machine": self.machine,
            "header": self.header,
            "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows, "notes": t.notes} for t in self.tables],
            **self.data,
            "goals": [g.to_json() for g in self.goals] + list(self.data.get("goals", [])),
        }

    def write(self, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``<name>-<host>.md`` and ``.json`` into ``out_dir``; returns both paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{self.name}-{host_tag()}"
        md, js = out / f"{stem}.md", out / f"{stem}.json"
        md.write_text(self.markdown())
        js.write_text(json.dumps(self.to_json(), indent=1, default=str) + "\n")
        return md, js
