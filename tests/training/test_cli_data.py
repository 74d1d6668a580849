"""`gtbus data build` and `gtbus data inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy
from click.testing import CliRunner

from gtbus.cli.data import data
from gtbus.training.shards import Dataset, read_raw, read_shard


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(data, list(args))
    return result.exit_code, result.output


def _sources(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "b.txt").write_bytes(b"bbb")
    (src / "a.txt").write_bytes(b"aa")
    (src / "pkg" / "c.txt").write_bytes(b"c")
    (src / ".hidden").write_bytes(b"secret")
    return src


def test_build_shard_from_files_and_directories(tmp_path: Path) -> None:
    src = _sources(tmp_path)
    (tmp_path / "first.txt").write_bytes(b"!")
    code, out = _run("build", str(tmp_path / "first.txt"), str(src), "--out", str(tmp_path / "o.bin"))
    assert code == 0, out
    assert "7 tokens from 4 files" in out
    assert bytes(read_shard(tmp_path / "o.bin").astype(numpy.uint8)) == b"!aabbbc"


def test_build_raw(tmp_path: Path) -> None:
    code, out = _run("build", str(_sources(tmp_path)), "--raw", "--out", str(tmp_path / "o.raw"))
    assert code == 0, out
    assert bytes(read_raw(tmp_path / "o.raw")) == b"aabbbc"


def test_build_demo_corpus(tmp_path: Path) -> None:
    code, out = _run("build", "--demo-corpus", "--holders", "2", "--bytes-per-holder", "4096",
                     "--out", str(tmp_path / "demo"))
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["holder00.bin", "holder01.bin"]
    assert out.count("4096 tokens") == 2


def test_inspect_prints_header_count_and_digest(tmp_path: Path) -> None:
    _run("build", str(_sources(tmp_path)), "--out", str(tmp_path / "o.bin"))
    code, out = _run("inspect", str(tmp_path / "o.bin"), "--json", "--chunk-tokens", "4")
    assert code == 0, out
    report = json.loads(out)
    assert report["magic"] == 20240520 and report["version"] == 1
    assert report["tokens"] == 6 and report["chunk_count"] == 2
    assert report["min_token"] == ord("a") and report["max_token"] == ord("c")
    assert report["digest"] == Dataset([tmp_path / "o.bin"]).digest().hex()
    code, text = _run("inspect", str(tmp_path / "o.bin"))
    assert code == 0 and report["digest"] in text and "magic" in text


def test_inspect_raw(tmp_path: Path) -> None:
    (tmp_path / "r").write_bytes(b"xyz")
    code, out = _run("inspect", "--raw", "--json", str(tmp_path / "r"))
    assert code == 0 and json.loads(out)["tokens"] == 3


def _error_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_bad_input_is_one_line_naming_the_problem(tmp_path: Path) -> None:
    (tmp_path / "junk.bin").write_bytes(b"\1" * 2000)
    cases = [
        (("inspect", str(tmp_path / "junk.bin")), "junk.bin: not an llm.c token shard"),
        (("inspect", str(tmp_path / "none.bin")), "none.bin: no such file"),
        (("build", str(tmp_path / "nope"), "--out", str(tmp_path / "o.bin")), "nope: no such file or directory"),
        (("build", "--out", str(tmp_path / "o.bin")), "no SOURCES"),
        (("build", "--demo-corpus", "x", "--out", str(tmp_path)), "takes no SOURCES"),
        (("build", str(tmp_path / "junk.bin"), "--out", str(tmp_path / "junk.bin" / "o.bin")), "cannot write"),
    ]
    for args, needle in cases:
        code, out = _run(*args)
        assert code == 1, (args, out)
        assert needle in _error_line(out), (args, out)
    # A missing output folder is created, as `mkdir -p` would.
    code, out = _run("build", str(tmp_path / "junk.bin"), "--out", str(tmp_path / "new" / "dir" / "o.bin"))
    assert code == 0 and (tmp_path / "new" / "dir" / "o.bin").exists(), out
