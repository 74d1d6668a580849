"""Runbooks name a fleet: ``gpus`` and ``merge_every`` in [training], checked and passed to the orchestrator."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_runbook import _prepare

from gtbus.errors import ConfigError
from gtbus.runbook.config import load_runbook
from gtbus.runbook.control import node_argv


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared deployment (keys, data, platform key) for every runbook variant here."""
    return _prepare(tmp_path_factory.mktemp("rb"), holders=2)


def _with(good: Path, lines: str) -> Path:
    rb = good.parent / f"fleet-{abs(hash(lines))}.toml"
    rb.write_text(good.read_text().replace("[training]\n", f"[training]\n{lines}\n"))
    return rb


def test_gpus_and_merge_every_reach_the_orchestrator(good: Path) -> None:
    rb = load_runbook(_with(good, 'gpus = 2\nmerge_every = 3\nmerge = "delta:1.5"'))
    argv = node_argv(rb, rb.orchestrator, "00" * 32)
    assert argv[argv.index("--gpus") + 1] == "2" and argv[argv.index("--merge-every") + 1] == "3"
    assert argv[argv.index("--merge") + 1] == "delta:1.5"
    default = load_runbook(good)
    argv = node_argv(default, default.orchestrator, "00" * 32)
    assert argv[argv.index("--gpus") + 1] == "1" and argv[argv.index("--merge-every") + 1] == "0"
    assert argv[argv.index("--merge") + 1] == "average"


def test_prepare_reaches_the_orchestrator(good: Path) -> None:
    default = load_runbook(good)
    assert "--prepare" in node_argv(default, default.orchestrator, "00" * 32)
    off = load_runbook(_with(good, "prepare = false"))
    argv = node_argv(off, off.orchestrator, "00" * 32)
    assert "--no-prepare" in argv and "--prepare" not in argv


@pytest.mark.parametrize("line, words", [
    ("gpus = 0", "gpus must be an integer from 1 to 64"),
    ("gpus = 65", "gpus must be an integer from 1 to 64"),
    ("gpus = true", "gpus must be an integer from 1 to 64"),
    ('gpus = "2"', "gpus must be an integer from 1 to 64"),
    ("gpus = 1e9", "gpus must be an integer from 1 to 64"),
    ("merge_every = -1", "merge_every must be 0"),
    ("merge_every = 2.5", "merge_every must be 0"),
    ('merge = "mean"', "merge: "),
    ('merge = "delta:-2"', "merge: "),
    ("merge = 3", "merge: give average, sum, or delta:LR"),
    ("merge = true", "merge: give average, sum, or delta:LR .*or lockstep"),
    ('prepare = "yes"', "prepare must be true or false"),
    ("prepare = 1", "prepare must be true or false"),
])
def test_bad_fleet_values_are_named(good: Path, line: str, words: str) -> None:
    with pytest.raises(ConfigError, match=r"\[training\]: " + words):
        load_runbook(_with(good, line))
