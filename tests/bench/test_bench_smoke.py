"""Tiny runs of each benchmark: the result files exist with the expected rows and keys, numbers are positive.

No timing is asserted here: performance is what `gtbus bench` prints and keeps
under bench/results/, never a wall-clock limit in a test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gtbus.bench.bus import VARIANTS, run_bus_bench
from gtbus.bench.report import host_tag, latency_stats
from gtbus.bench.travel import default_caps, parse_caps, plan, run_travel_bench
from gtbus.errors import ConfigError


def test_latency_stats_percentiles() -> None:
    s = latency_stats([i * 1000 for i in range(1, 101)])  # 1..100 us
    assert s["n"] == 100
    assert s["min_us"] == 1.0 and s["median_us"] == 50.5
    assert s["p90_us"] == 90.0 and s["p99_us"] == 99.0


def test_default_caps_scale_with_the_data_and_split_steps_exactly() -> None:
    caps = default_caps(24, 3)
    assert [c.nbytes for c in caps] == [128 << 10, 512 << 10, 2 << 20, 4 << 20, None]
    p = plan(caps, 24, 3, 3072)
    assert [r["hops"] for r in p.rows] == [192, 48, 12, 6, 3]
    assert [r["steps_per_hop"] for r in p.rows] == [16, 64, 256, 512, 1024]
    assert {r["steps_total"] for r in p.rows} == {3072}
    assert p.holder_tokens == 4 << 20


def test_caps_option_parses_sizes_and_refuses_nonsense() -> None:
    assert [c.nbytes for c in parse_caps("4,20K,1.5M,uncapped", 3072)] == [4 << 20, 20 << 10, 3 << 19, None]
    with pytest.raises(ConfigError):
        parse_caps("lots", 24)
    with pytest.raises(ConfigError):
        parse_caps("100", 24)[0] and parse_caps("0.0001", 24)  # 104 bytes: below a 64-token hop
    with pytest.raises(ConfigError):
        plan(parse_caps("uncapped", 0.0001), 0.0001, 3, 10)  # 17 tokens per holder


@pytest.mark.slow
def test_bus_bench_smoke(tmp_path: Path) -> None:
    res = run_bus_bench(tmp_path, seconds=0.3, slices=1, warmup=20, profile=False, say=lambda s: None)
    md = tmp_path / f"bus-{host_tag()}.md"
    js = tmp_path / f"bus-{host_tag()}.json"
    assert md.exists() and js.exists()
    data = json.loads(js.read_text())
    assert data["machine"]["hostname"] and data["machine"]["cores"] >= 1
    for v in VARIANTS:
        rt = data["round_trip_us"][v]
        assert rt["n"] > 0
        assert 0 < rt["min_us"] <= rt["median_us"] <= rt["p90_us"] <= rt["p99_us"]
        assert data["oneway"][v]["messages"] > 0 and data["oneway"][v]["msgs_per_s"] > 0
    assert all(us > 0 for us in data["message_layer_us"].values())
    text = md.read_text()
    for v in VARIANTS:
        assert f"| {v} |" in text
    assert "Where the signed round trip spends its time" in res.markdown()
    # The anchor is the faster raw asyncio variant; both goals are recorded, met computed from the numbers.
    assert data["anchor"] in ("raw-asyncio-zmq", "raw-asyncio-fd")
    assert data["round_trip_us"][data["anchor"]]["median_us"] == min(data["round_trip_us"][v]["median_us"] for v in ("raw-asyncio-zmq", "raw-asyncio-fd"))
    goals = {g["name"]: g for g in data["goals"]}
    ratio = next(g for n, g in goals.items() if n.startswith("signed round trip / raw asyncio pyzmq"))
    assert ratio["goal"] == (2.5 if data["machine"].get("gpu") else 2.0) and ratio["unit"] == "x"
    assert ratio["met"] == (ratio["measured"] <= ratio["goal"])
    assert goals["signed round trip, median"]["goal"] == 300.0


@pytest.mark.slow
def test_travel_bench_smoke(tmp_path: Path) -> None:
    # 3 holders x 64K tokens; cap 64K bytes = 2 chunks per holder; plus uncapped.
    run_travel_bench(
        tmp_path, total_mib=0.375, caps="64K,uncapped", train_steps=12, chunk_mib=2, reps=1, say=lambda s: None,
    )
    md = tmp_path / f"travel-host-{host_tag()}.md"
    js = tmp_path / f"travel-host-{host_tag()}.json"
    assert md.exists() and js.exists()
    data = json.loads(js.read_text())
    runs = {(r["cap"], r["mode"]): r for r in data["runs"]}
    assert set(runs) == {("64K", "ship"), ("64K", "travel"), ("uncapped", "ship"), ("uncapped", "travel")}
    expected_hops = {"64K": 6, "uncapped": 3}
    for (cap, _mode), r in runs.items():
        assert r["hops_trained"] == r["hops"] == expected_hops[cap]
        assert r["steps_total"] == 12
        assert r["transfer_s"] > 0 and r["train_s"] > 0 and 0 < r["transfer_share"] < 1
        # Each trained hop's transfer, in order: together the run's provision + open.
        assert len(r["hop_tx_ms"]) == r["hops_trained"]
        assert abs(sum(r["hop_tx_ms"]) / 1e3 - (r["provision_s"] + r["open_s"])) < 1e-3 * r["hops_trained"]
    prov = data["provisioning"]
    for key in ("seal_gbps", "open_gbps", "end_to_end_gbps", "memcpy_gbps"):
        assert prov[key] > 0
    table = data["tables"][0]
    assert table["columns"][:7] == ["cap", "ship training s", "ship tx s", "ship tx %", "travel training s", "travel tx s", "travel tx %"]
    assert [row[0] for row in table["rows"]] == ["64K", "uncapped"]
    assert "| 64K |" in md.read_text()


def test_cli_lists_both_benchmarks() -> None:
    from gtbus.cli.main import main

    out = CliRunner().invoke(main, ["bench", "--help"])
    assert out.exit_code == 0
    assert "bus" in out.output and "travel" in out.output


def test_a_cut_off_travel_bench_leaves_what_it_measured(tmp_path: Path) -> None:
    # The bench is stopped right after its first run (as a device run's time limit would);
    # the result file already holds that run, marked partial.
    class Stop(Exception):
        pass

    starts: list[str] = []

    def say(line: str) -> None:
        if line.lstrip().startswith("cap "):
            starts.append(line)
            if len(starts) == 2:  # the second run is about to start: the first is written
                raise Stop

    with pytest.raises(Stop):
        run_travel_bench(tmp_path, total_mib=0.375, caps="64K,uncapped", train_steps=12, chunk_mib=2, reps=1, say=say)
    data = json.loads((tmp_path / f"travel-host-{host_tag()}.json").read_text())
    assert data["header"][0].startswith("PARTIAL: 1 of 4 runs")
    assert len(data["runs"]) == 1 and data["runs"][0]["hops_trained"] == data["runs"][0]["hops"] == 6
    assert [g["name"] for g in data["goals"]][-1].startswith("tokens/s in loop / alone")
