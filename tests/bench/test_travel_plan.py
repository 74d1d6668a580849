"""The table's planning: data per holder, hops per cap, and the training budget split over hops in proportion to bytes.

Pure arithmetic, no processes. The split's rule is the orchestrator's
``--steps per:N`` (each hop trains max(1, round(tokens / N)) steps), so the
plan and the trainers must agree on it: checked here against the trainers'
own resolver.
"""

from __future__ import annotations

import pytest

from gtbus.bench.travel_plan import TALK_CAPS, hop_steps, parse_caps, plan
from gtbus.errors import ConfigError
from gtbus.training.trainer import ONE_PASS, StepsPer, WorkloadError, parse_steps, resolve_steps

GPT2_MIN = 1025  # GPT-2's context plus one: the shortest buffer it trains on


def test_talk_caps_on_two_600_mib_holders_split_600_steps_exactly() -> None:
    p = plan(parse_caps(TALK_CAPS, 1200, 2), 1200, 2, 600, min_chunk_tokens=GPT2_MIN)
    assert p.holder_tokens == 600 * 2**20 // 2  # 600 MiB of uint16 tokens per holder, no rounding
    assert p.steps_option == "per:1048576"  # one step per 2 MiB of tokens
    rows = {r["cap"]: r for r in p.rows}
    assert [r["hops"] for r in p.rows] == [300, 60, 12, 4, 2]
    assert [r["steps_per_hop"] for r in p.rows] == [2, 10, 50, 250, 300]
    # 500M is a real cap below uncapped: 500 + 100 MiB per holder, the short chunk trains in proportion.
    assert rows["500M"]["holder_chunks"] == [250 * 2**20, 50 * 2**20]
    assert (rows["500M"]["steps_per_hop"], rows["500M"]["last_steps"]) == (250, 50)
    assert {r["steps_total"] for r in p.rows} == {600}
    assert "shorter" in p.rounded_note and "differ" not in p.rounded_note


def test_an_inexact_split_rounds_each_hop_and_says_so() -> None:
    # 3 holders x 65536 tokens, 12 steps: one per 16384 tokens; a 48K cap is 24576 tokens = 1.5 steps.
    p = plan(parse_caps("32K,48K,uncapped", 0.375, 3), 0.375, 3, 12)
    rows = {r["cap"]: r for r in p.rows}
    assert rows["32K"]["steps_total"] == 12 and rows["uncapped"]["steps_total"] == 12
    assert rows["48K"]["holder_chunks"] == [24576, 24576, 16384]
    assert rows["48K"]["steps_total"] == 3 * (2 + 2 + 1)  # round half to even, then the short chunk's 1
    assert "differ from 12" in p.rounded_note


def test_every_hop_trains_at_least_one_step() -> None:
    # 3072 tokens a holder, 2 steps: one step per 4608 tokens; a 256-token hop would round to 0.
    p = plan(parse_caps("512B,uncapped", 3072 * 3 * 2 / 2**20, 3), 3072 * 3 * 2 / 2**20, 3, 2)
    small = p.rows[0]
    assert small["steps_per_hop"] == 1 and small["steps_total"] == small["hops"]


def test_data_is_rounded_to_the_smallest_cap() -> None:
    p = plan(parse_caps("4M,uncapped", 25, 2), 25, 2, 6, min_chunk_tokens=GPT2_MIN)
    assert p.holder_tokens == 3 * 2**21  # 12.5 MiB a holder -> 12 MiB (6 Mi tokens), three whole 4 MiB chunks
    assert "rounded down" in p.rounded_note
    assert [r["steps_total"] for r in p.rows] == [6, 6]


def test_plan_refuses_what_cannot_run() -> None:
    with pytest.raises(ConfigError, match="needs at least 1025"):
        plan(parse_caps("1K,uncapped", 8, 2), 8, 2, 10, min_chunk_tokens=GPT2_MIN)
    with pytest.raises(ConfigError, match="at most one step per token"):
        plan(parse_caps("uncapped", 0.01, 1), 0.01, 1, 10**6)
    with pytest.raises(ConfigError, match="a hop needs at least"):
        plan(parse_caps("uncapped", 0.001, 2), 0.001, 2, 1, min_chunk_tokens=GPT2_MIN)


@pytest.mark.parametrize("tokens", [1, 1025, 16383, 16384, 24576, 40960, 2**21, 262144000])
def test_the_plan_and_the_trainers_count_a_hops_steps_alike(tokens: int) -> None:
    for per in (1, 4096, 16384, 2**20):
        assert hop_steps(tokens, per) == resolve_steps(StepsPer(per), tokens, one_pass=999)


def test_steps_option_parses_and_refuses_nonsense_in_one_line() -> None:
    assert parse_steps("pass") == ONE_PASS
    assert parse_steps("40") == 40
    assert parse_steps("per:1048576") == StepsPer(1048576)
    for bad in ("0", "-3", "per:0", "per:", "per:x", "each:4", "lots", "1.5", ""):
        with pytest.raises(WorkloadError, match="--steps"):
            parse_steps(bad)
    with pytest.raises(ValueError):
        StepsPer(0)
    assert resolve_steps(ONE_PASS, 1000, one_pass=7) == 7
    assert resolve_steps(3, 1000, one_pass=7) == 3
