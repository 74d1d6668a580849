"""Fixtures for provenance tests: one real run shared by the tests that only read what it left."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

# The real-process deployment kit lives beside the node tests, the real command beside the
# export tests; reuse them, do not copy them.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "nodes"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "export"))

from travel_kit import Travel  # noqa: E402


def _nodes_fixtures() -> Any:
    # The node tests' `travel` fixture, used as it is (one copy of it), under another module name.
    spec = importlib.util.spec_from_file_location("nodes_conftest", Path(__file__).resolve().parent.parent / "nodes" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


travel = _nodes_fixtures().travel


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Travel]:
    """A completed 2-holder, 2-round run on the host backend (real processes, sockets, keys and files)."""
    t = Travel(tmp_path_factory.mktemp("prov") / "run", holders=2, rounds=2, chunk_tokens=16384, steps="4", bytes_per_holder=48 * 1024)
    try:
        t.start()
        t.finish()
        yield t
    finally:
        t.close()

