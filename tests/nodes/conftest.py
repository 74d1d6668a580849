"""Fixtures for end-to-end and fault tests with real node processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from travel_kit import Travel


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
