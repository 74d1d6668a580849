"""runbooks/README.md's air-gapped attestation procedure, run exactly as written (its files written, its commands run)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("dcap_qvl", reason="dcap-qvl not installed (pip install 'gtbus[attest-tdx]')")

ROOT = Path(__file__).parents[2]
SECTION = "## Attestation on an air-gapped site: fetch, carry, check"


def doc_section() -> str:
    text = (ROOT / "runbooks" / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end != -1 else None]


def blocks(section: str) -> list[tuple[str, str]]:
    """Each fenced block as (info, body)."""
    return re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S)


def test_the_documented_procedure_runs_as_written(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "tests" / "attest" / "data" / "dcap-qvl", tmp_path / "sample")
    steps = 0
    for info, body in blocks(doc_section()):
        first, _, rest = body.partition("\n")
        if info == "toml":
            name = re.fullmatch(r"# file: (\S+)", first)
            assert name, f"a toml block must start with '# file: NAME': {first!r}"
            (tmp_path / name.group(1)).write_text(rest)
            continue
        assert first.startswith("$ gtbus "), first
        expected = [line for line in rest.splitlines() if line]
        r = subprocess.run(
            [sys.executable, "-m", "gtbus", *shlex.split(first[len("$ gtbus "):])],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )
        steps += 1
        if not expected:
            assert r.returncode == 0, f"{first}\n{r.stdout}{r.stderr}"
            continue
        # A block that shows output shows the failure line the command must print (exit status 1).
        assert r.returncode == 1, f"{first}\n{r.stdout}{r.stderr}"
        fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
        for want in expected:
            pattern = re.escape(want).replace(r"\.\.\.", ".*")
            assert any(re.fullmatch(pattern, got) for got in fails), f"{first}: wanted {want!r}, got {fails}"
    assert steps == 4
    assert (tmp_path / "bundle" / "manifest.json").exists()
