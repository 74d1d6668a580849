"""The signed manifest of a GPT-2 run trained on the GPU: `gtbus export` takes it along and `--check` verifies it there.

The run is the GPT-2 export tests' own (its fixture, one copy: `--backend cupy
--trainer gpt2`, 2 holders, 4 hops). The final digest the orchestrator's GPU
measured (the BLAKE3 kernel over the flat parameter buffer) must be what the
exported files give on the host, every hop must match the holders' signed
returns in the logs, and a holder's receipt must check against its data.
Skipped cleanly without cupy, torch or a GPU (as in CI).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cuda_guard import cupy_or_skip

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "export"))

from export_kit import gtbus_here  # noqa: E402

cupy_or_skip()
pytest.importorskip("torch")

from test_export_gpt2_gpu import run  # noqa: E402,F401  (the GPU run, as a fixture of this module too)

from gtbus.provenance.document import read_document  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_the_gpu_runs_manifest_names_the_exported_model_and_agrees_with_the_logs(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    done = gtbus_here("export", run, "--out", out)
    assert done.returncode == 0, done.stderr
    manifest = read_document(out / "manifest.json").body
    assert manifest["trainer"] == "gpt2" and manifest["settings"]["backend"] == "cupy" and len(manifest["hops"]) == 4
    done = gtbus_here("export", "--check", out, "--logs", run / "logs", "--keys", run / "keys")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "agrees with the logs" in done.stdout
    data = sorted((run.parent / "data").glob("holder*.bin"))
    receipt = next((run / "receipts" / "h1").glob("*.json"))
    done = gtbus_here("holder-receipt", "check", "--receipt", receipt, "--manifest", out / "manifest.json",
                      "--key", run / "keys" / "h1.key", "--keys", run / "keys", "--data", data[0])
    assert done.returncode == 0, done.stdout + done.stderr
