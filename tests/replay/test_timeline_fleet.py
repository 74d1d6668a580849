"""The picture of a real fleet run: two GPU tokens travelling at once, drawn from the orchestrator's log."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

# The real-process deployment kit lives beside the node tests; reuse it, do not copy it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "nodes"))

from travel_kit import Travel  # noqa: E402

from gtbus.messages.identity import Roster  # noqa: E402
from gtbus.replay.hop_spans import read_hops  # noqa: E402

pytestmark = pytest.mark.slow

SVG = "{http://www.w3.org/2000/svg}"
CHUNK = 4096


def test_a_two_gpu_run_draws_a_row_per_token_with_its_own_hops(tmp_path: Path) -> None:
    t = Travel(tmp_path / "run", holders=3, gpus=2, chunk_tokens=CHUNK, bytes_per_holder=2 * CHUNK, steps="5")
    try:
        t.start()
        summary = t.finish()
    finally:
        t.close()
    hops = t.hops()
    assert summary["gpus"] == 2 and len(hops) == 6
    out = tmp_path / "fleet.svg"
    r = subprocess.run([sys.executable, "-m", "gtbus", "replay", "--timeline", str(t.logs), "--out", str(out), "--keys", str(t.dep.keys)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "2 GPUs, 3 holders, 6 hops (6 trained)" in r.stdout
    root = ET.parse(out).getroot()
    rows = {g.get("data-token"): g for g in root.iter(SVG + "g") if g.get("class") == "lane token"}
    assert list(rows) == ["gpu0", "gpu1"]
    assert [g.get("data-holder") for g in root.iter(SVG + "g") if g.get("class") == "lane holder"] == ["h1", "h2", "h3"]
    # Each hop is drawn on the token the orchestrator's checkpoint says it ran on, once, with its outcome.
    for token, row in rows.items():
        drawn = {int(g.get("data-epoch", "0")): g.get("data-outcome") for g in row.iter(SVG + "g") if g.get("class") == "hop"}
        assert drawn == {h["epoch"]: h["outcome"] for h in hops if h["token_id"] == token}, token
    # The tokens travelled at once: a hop of one was out while a hop of the other was.
    run = read_hops(t.logs, [Roster.from_dir(t.dep.keys)])
    a, b = ([h for h in run.hops if h.token_id == k] for k in ("gpu0", "gpu1"))
    assert any(x.granted < y.end and y.granted < x.end for x in a for y in b)
    # No holder held two tokens at once.
    for holder in run.holders:
        spans = sorted((h.granted, h.held_until) for h in run.hops if h.holder == holder)
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:])), holder
