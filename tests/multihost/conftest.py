"""Fixtures for deployments across servers, played by network namespaces."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from netns_lab import LabUnavailable, NetnsLab
from sshd_lab import SshdLab, require_sshd


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    """Three servers (gpu .1, hola .2, holb .3) and this machine (.254) on one bridge; removed afterwards."""
    try:
        NetnsLab.require()
    except LabUnavailable as exc:
        pytest.skip(str(exc))
    lab = NetnsLab({"gpu": 1, "hola": 2, "holb": 3})
    try:
        try:
            lab.start()
        except (LabUnavailable, RuntimeError) as exc:  # e.g. no bridge or veth support in this kernel
            pytest.skip(f"cannot build the namespace lab here: {exc}")
        yield lab
    finally:
        lab.close()


@pytest.fixture
def sshd_lab(lab: NetnsLab, tmp_path: Path) -> Iterator[SshdLab]:
    """A real sshd in each of ``lab``'s servers, a client key and a known_hosts pinning them; stopped afterwards."""
    try:
        require_sshd()
    except LabUnavailable as exc:
        pytest.skip(str(exc))
    servers = SshdLab(lab, tmp_path / "ssh")
    try:
        servers.start()
        yield servers
    finally:
        servers.close()
