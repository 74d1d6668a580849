"""README.md's provenance steps ("The model leaves with its provenance"), run exactly as written on a real demo run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from export_kit import DemoRun

ROOT = Path(__file__).parents[2]
SECTION = "### The model leaves with its provenance"


def readme_steps() -> str:
    """The section's one indented command block, as shell text."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start)
    lines = text[start:end].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("    "))
    block = []
    for line in lines[first:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip() + "\n"


def test_the_readme_steps_run_as_written(demo_run: DemoRun, tmp_path: Path) -> None:
    steps = readme_steps()
    assert "gtbus export" in steps and "gtbus holder-receipt check" in steps and "gtbus sample" in steps
    shutil.copytree(demo_run.run_dir, tmp_path / "runs" / "demo-20260101-000000")
    # `gtbus` as the user has it: this interpreter's gtbus, whatever is on PATH.
    script = f'set -euo pipefail\ngtbus() {{ "{sys.executable}" -m gtbus "$@"; }}\n{steps}'
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    oks = [line for line in r.stdout.splitlines() if line.startswith("ok ")]
    assert len(oks) == 2, r.stdout  # export --check, and the holder's receipt check
    assert (tmp_path / "model" / "model.safetensors").exists() and (tmp_path / "model" / "manifest.json").exists()
