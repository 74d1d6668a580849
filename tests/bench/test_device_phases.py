"""bench device's hop breakdown: a real three-hop run (processes, CURVE, signatures) read back as a phase table.

No timing is asserted: what is checked is that every phase of both sides is
found and measured for the hops after the first, as `gtbus bench device` prints them.
"""

from __future__ import annotations

from pathlib import Path

from gtbus.bench.device import phase_table, protocol_runs
from gtbus.nodes.hop_phases import ORCHESTRATOR_PHASES, RETURN_LINE_PHASES


def test_a_full_protocol_run_reads_back_as_a_phase_table(tmp_path: Path) -> None:
    run = protocol_runs("host", 64, 3, "travel", tmp_path)
    trained = [h for h in run["hop_records"] if h["outcome"] == "trained"]
    assert [h["epoch"] for h in trained] == [1, 2, 3]
    # The holder's hop lines, by epoch, each with all of its phases.
    assert sorted(run["holder_phases"]) == [1, 2, 3]
    assert all(sorted(n for n, _ in p) == sorted(RETURN_LINE_PHASES) for p in run["holder_phases"].values())
    t = phase_table("control", run)
    rows = {(side, phase) for side, phase, *_ in t.rows}
    # The last hop's checkpoint and publish marks come after its checkpoint was written.
    assert {("orchestrator", n) for n in ORCHESTRATOR_PHASES if n not in ("checkpoint", "publish")} <= rows
    assert {("holder", n) for n in RETURN_LINE_PHASES} <= rows
    assert all(float(median) >= 0 and float(p90) >= 0 for *_, median, p90 in t.rows)
    assert "2 hops" in t.notes[0]  # the first hop (warm-up) is left out
