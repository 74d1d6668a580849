"""Fixtures of the messages-layer tests (helpers live in ``msgkit``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from gtbus.messages import ReceivePipeline, ReplayGuard
from msgkit import Deployment, FakeClock, make_deployment


@pytest.fixture(scope="session")
def dep() -> Deployment:
    return make_deployment()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_pipeline(dep: Deployment, clock: FakeClock) -> Iterator[Callable[..., ReceivePipeline]]:
    """``make_pipeline(me, journal=None, **limits_or_guard_kwargs)``: a fresh receiver on the shared clock."""

    guards: list[ReplayGuard] = []

    def make(me: str, journal: str | os.PathLike[str] | None = None, limits: Any = None, **guard_kw: Any) -> ReceivePipeline:
        guard = ReplayGuard(clock, journal=journal, **guard_kw)
        guards.append(guard)
        if limits is None:
            return ReceivePipeline(me, dep.roster, guard)
        return ReceivePipeline(me, dep.roster, guard, limits)

    yield make
    for g in guards:
        g.close()


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "state" / "replay.journal"
