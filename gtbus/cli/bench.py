"""``gtbus bench``: measured numbers, printed as tables and kept under bench/results/."""

from __future__ import annotations

import click


@click.group()
def bench() -> None:
    """Benchmarks (results go to bench/results/<name>-<host>.md and .json)."""
