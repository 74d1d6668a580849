"""Fixtures for transport tests: a deployment of real CURVE keys (PyNaCl)."""

from __future__ import annotations

import pytest
from nacl.public import PrivateKey
from transport_helpers import Deployment


@pytest.fixture
def deployment() -> Deployment:
    return Deployment(PrivateKey.generate(), {n: PrivateKey.generate() for n in ("h1", "h2", "h3")})
