"""The README's measured table is generated from the result files' goals lists, and kept in step with them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gtbus.bench.readme_table import BEGIN, END, load_goals, update_readme
from gtbus.bench.report import Result
from gtbus.cli.main import main as cli
from gtbus.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _result(tmp: Path, name: str, *goals: tuple[str, float, float, str, bool]) -> Path:
    res = Result(name, name, {"cpu": "Test CPU", "usable_cores": 2, "gpu": "NVIDIA H200"})
    for g in goals:
        res.goal(g[0], g[1], g[2], g[3], at_most=g[4])
    path = tmp / f"{name}-x.json"
    path.write_text(json.dumps(res.to_json()))
    return path


def test_the_repository_readme_matches_its_results() -> None:
    out = CliRunner().invoke(cli, ["bench", "readme", "--check", "--results", str(ROOT / "bench/results"), "--readme", str(ROOT / "README.md")])
    assert out.exit_code == 0, out.output


def test_table_has_every_goal_with_its_verdict_and_machine(tmp_path: Path) -> None:
    _result(tmp_path, "bus", ("signed / raw round trip", 2.4, 2.0, "x", True))
    _result(tmp_path, "device", ("provisioning / bound", 0.85, 0.8, "x", False))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold\n{END}\ntail\n")
    old, new = update_readme(readme, tmp_path)
    assert old != new and new.startswith("intro\n") and new.endswith("tail\n") and "old" not in new
    assert "1 of 2 goals met." in new
    assert "| bus | signed / raw round trip: <= 2 x | 2.4 x | **no** | NVIDIA H200 (Test CPU, 2 cores) |" in new
    assert "| device | provisioning / bound: >= 0.8 x | 0.85 x | yes |" in new
    readme.write_text(new)
    assert update_readme(readme, tmp_path)[0] == update_readme(readme, tmp_path)[1]  # idempotent


def test_check_fails_when_a_result_changed(tmp_path: Path) -> None:
    _result(tmp_path, "bus", ("rtt", 300, 250, "us", True))
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\n")
    run = CliRunner().invoke(cli, ["bench", "readme", "--results", str(tmp_path), "--readme", str(readme)])
    assert run.exit_code == 0 and "rewritten" in run.output
    _result(tmp_path, "bus", ("rtt", 200, 250, "us", True))
    check = CliRunner().invoke(cli, ["bench", "readme", "--check", "--results", str(tmp_path), "--readme", str(readme)])
    assert check.exit_code == 1 and "out of date" in check.output


@pytest.mark.parametrize(
    "goals, words",
    [
        ("not a list", "goals must be a list"),
        ([{"name": "x", "measured": "fast", "goal": 1, "unit": "s", "met": True}], "measured must be a number"),
        ([{"name": "x", "measured": 1, "goal": 1, "unit": "s", "met": "yes"}], "met must be true or false"),
        ([{"name": "x", "measured": 5, "goal": 1, "unit": "s", "met": True, "direction": "at most"}], "says met=True"),
        ([7], "not a mapping"),
    ],
)
def test_bad_result_files_are_one_clear_error(tmp_path: Path, goals: object, words: str) -> None:
    (tmp_path / "bad-x.json").write_text(json.dumps({"benchmark": "bad", "goals": goals}))
    with pytest.raises(ConfigError, match=words) as err:
        load_goals(tmp_path)
    assert "bad-x.json" in str(err.value) and "\n" not in str(err.value)


def test_unreadable_json_and_missing_markers(tmp_path: Path) -> None:
    (tmp_path / "junk-x.json").write_text("{not json")
    with pytest.raises(ConfigError, match="junk-x.json is not a readable JSON result"):
        load_goals(tmp_path)
    (tmp_path / "junk-x.json").unlink()
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(ConfigError, match="must hold the two marker lines"):
        update_readme(readme, tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_goals(tmp_path / "nope")
