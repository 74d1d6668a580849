"""Fixtures for hostile-peer tests: real deployments, real processes and sockets.

Each test plays one attacker with a valid deployment key, built from gtbus's
own classes, and checks that the run goes on (or ends with a named reason),
that nothing of the attacker's is trained, and that the orchestrator's peak
memory stays under the cap the test states.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

# The real-process deployment kit lives beside the node tests; reuse it, do not copy it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "nodes"))

from travel_kit import Travel  # noqa: E402


@pytest.fixture
def travel(tmp_path: Path) -> Iterator[Callable[..., Travel]]:
    """Make a :class:`Travel` run in a fresh folder; every process it started is gone after the test."""
    made: list[Travel] = []

    def make(**options: Any) -> Travel:
        t = Travel(tmp_path / f"run{len(made)}", **options)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()
