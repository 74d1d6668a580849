"""One real CPU run for the export tests: `gtbus demo` (orchestrator and 2 holders as processes), shared by the session.

The demo itself ends by exporting the final model to RUN/export and printing
a sample from it beside one from the untrained model; the tests read what it
printed and work on copies of what it wrote.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from export_kit import DEMO_ARGS, DemoRun, run_demo  # noqa: E402


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    run = tmp_path_factory.mktemp("export-demo") / "run"
    return DemoRun(run, run_demo(run, *DEMO_ARGS).stdout)


@pytest.fixture
def run_copy(demo_run: DemoRun, tmp_path: Path) -> Path:
    """A private copy of the run's folder (checkpoint and all), free to damage."""
    return Path(shutil.copytree(demo_run.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("logs", "data")))


@pytest.fixture
def export_copy(demo_run: DemoRun, tmp_path: Path) -> Path:
    """A private copy of the demo's export, free to damage."""
    return Path(shutil.copytree(demo_run.run_dir / "export", tmp_path / "export"))
