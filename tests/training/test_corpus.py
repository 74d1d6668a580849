"""The demo corpus: stdlib sources, split disjointly and deterministically among holders."""

from __future__ import annotations

from pathlib import Path

import numpy

from gtbus.training.corpus import (
    build_demo_corpus,
    holder_bytes,
    split_round_robin,
    stdlib_root,
    stdlib_sources,
)
from gtbus.training.shards import read_shard


def _fake_stdlib(root: Path) -> None:
    for rel in ["b.py", "a.py", "pkg/z.py", "pkg/c.py", "site-packages/third.py", "x.txt", "d.py"]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {rel}\n" + "pass\n" * 3)


def test_sources_are_sorted_py_files_without_third_party_code(tmp_path: Path) -> None:
    _fake_stdlib(tmp_path)
    found = [p.relative_to(tmp_path).as_posix() for p in stdlib_sources(tmp_path)]
    assert found == ["a.py", "b.py", "d.py", "pkg/c.py", "pkg/z.py"]


def test_real_stdlib_has_plenty_of_text() -> None:
    sources = stdlib_sources()
    assert len(sources) > 200
    assert all("site-packages" not in p.parts for p in sources)
    assert any(p.name == "os.py" and p.parent == stdlib_root() for p in sources)


def test_round_robin_split_is_disjoint_and_complete() -> None:
    paths = [Path(f"f{i:03d}.py") for i in range(10)]
    parts = split_round_robin(paths, 3)
    assert parts[0] == [Path("f000.py"), Path("f003.py"), Path("f006.py"), Path("f009.py")]
    flat = [p for part in parts for p in part]
    assert sorted(flat) == paths and len(set(flat)) == len(flat)


def test_holder_bytes_cuts_at_the_limit(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"12345")
    (tmp_path / "b").write_bytes(b"6789")
    assert holder_bytes([tmp_path / "a", tmp_path / "b"], 7) == b"1234567"
    assert holder_bytes([tmp_path / "a", tmp_path / "b"], 100) == b"123456789"


def test_demo_corpus_is_disjoint_deterministic_and_capped(tmp_path: Path) -> None:
    cap = 48 * 1024
    first = build_demo_corpus(tmp_path / "one", holders=3, bytes_per_holder=cap)
    second = build_demo_corpus(tmp_path / "two", holders=3, bytes_per_holder=cap)
    assert [p.name for p in first] == ["holder00.bin", "holder01.bin", "holder02.bin"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]

    parts = split_round_robin(stdlib_sources(), 3)
    owned = [set(part) for part in parts]
    assert not (owned[0] & owned[1] or owned[0] & owned[2] or owned[1] & owned[2])
    texts = [bytes(read_shard(p).astype(numpy.uint8)) for p in first]
    for text, part in zip(texts, parts):
        assert len(text) == cap
        # Each holder's shard is exactly its own files, in order.
        assert text == holder_bytes(part, cap)
    assert len(set(texts)) == 3
