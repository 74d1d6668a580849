"""llm.c shards, raw files and the holder's Dataset: round trips, every corruption, the digest commitment."""

from __future__ import annotations

from pathlib import Path

import blake3
import msgpack
import numpy
import pytest

from gtbus.errors import GtbusError
from gtbus.training.shards import (
    HEADER_BYTES,
    SHARD_MAGIC,
    Dataset,
    ShardError,
    read_raw,
    read_shard,
    read_shard_header,
    write_shard,
)


def _tokens(n: int, seed: int = 0) -> numpy.ndarray:
    return numpy.random.default_rng(seed).integers(0, 65536, size=n).astype(numpy.uint16)


def _header(magic: int = SHARD_MAGIC, version: int = 1, count: int = 0) -> bytes:
    header = numpy.zeros(256, dtype="<i4")
    header[:3] = (magic, version, count)
    return header.tobytes()


def test_round_trip_keeps_every_token_and_the_llmc_layout(tmp_path: Path) -> None:
    tokens = _tokens(10_001)
    tokens[:2] = (0, 65535)
    path = write_shard(tmp_path / "a.bin", tokens)
    raw = path.read_bytes()
    header = numpy.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert list(header[:3]) == [20240520, 1, 10_001]
    assert not header[3:].any()
    assert len(raw) == HEADER_BYTES + 2 * 10_001
    back = read_shard(path)
    assert back.dtype == numpy.dtype("<u2")
    numpy.testing.assert_array_equal(back, tokens)
    assert read_shard_header(path).tokens == 10_001


def test_round_trip_of_bytes_and_python_ints(tmp_path: Path) -> None:
    write_shard(tmp_path / "b.bin", numpy.frombuffer(b"hello", dtype=numpy.uint8))
    assert bytes(read_shard(tmp_path / "b.bin").astype(numpy.uint8)) == b"hello"
    write_shard(tmp_path / "i.bin", [1, 2, 65535])
    assert read_shard(tmp_path / "i.bin").tolist() == [1, 2, 65535]


def test_empty_shard_round_trips(tmp_path: Path) -> None:
    write_shard(tmp_path / "e.bin", numpy.empty(0, dtype=numpy.uint16))
    assert read_shard(tmp_path / "e.bin").shape == (0,)


@pytest.mark.parametrize(
    ("tokens", "needle"),
    [
        (numpy.array([0, 65536]), "0..65535"),
        (numpy.array([-1, 3]), "0..65535"),
        (numpy.zeros((2, 2), dtype=numpy.uint16), "1-D"),
        (numpy.array([1.5]), "integers"),
    ],
)
def test_write_refuses_what_does_not_fit(tmp_path: Path, tokens: numpy.ndarray, needle: str) -> None:
    with pytest.raises(ShardError, match=needle):
        write_shard(tmp_path / "x.bin", tokens)
    assert not any(tmp_path.iterdir()), "a refused write leaves nothing behind"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "truncated shard: 0 bytes"),
        (_header()[:1000], "truncated shard: 1000 bytes"),
        (_header(magic=20240801, count=0), "not an llm.c token shard (magic 20240801"),
        (_header(version=2, count=0), "unsupported shard version 2"),
        (_header(count=-5), "negative token count"),
        (_header(count=10) + b"\0" * 18, "truncated shard: header says 10 tokens, file holds 9"),
        (_header(count=10) + b"\0" * 22, "token count mismatch: header says 10 tokens"),
        (_header(count=10) + b"\0" * 21, "token count mismatch"),
    ],
)
def test_every_corruption_is_one_line_naming_the_file(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(ShardError) as caught:
        read_shard(path)
    message = str(caught.value)
    assert needle in message
    assert message.startswith(str(path))
    assert "\n" not in message
    assert isinstance(caught.value, GtbusError)


def test_missing_file_and_directory_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="no such file"):
        read_shard(tmp_path / "absent.bin")
    with pytest.raises(ShardError, match="not a regular file"):
        read_shard(tmp_path)


def test_raw_file_is_one_token_per_byte(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(b"\x00\xffabc")
    assert read_raw(tmp_path / "t.txt").tolist() == [0, 255, 97, 98, 99]
    (tmp_path / "empty").write_bytes(b"")
    assert read_raw(tmp_path / "empty").shape == (0,)


def _three_shards(tmp_path: Path) -> tuple[list[Path], numpy.ndarray]:
    parts = [_tokens(1000, 1), _tokens(1, 2), _tokens(2500, 3)]
    paths = [write_shard(tmp_path / f"s{i}.bin", p) for i, p in enumerate(parts)]
    return paths, numpy.concatenate(parts)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 999, 1000, 1001, 3501, 5000])
def test_chunks_tile_the_stream_across_files(tmp_path: Path, chunk_tokens: int) -> None:
    paths, stream = _three_shards(tmp_path)
    dataset = Dataset(paths, name="three")
    assert dataset.total_tokens == 3501
    chunks = list(dataset.chunks(chunk_tokens))
    assert [i for i, _ in chunks] == list(range(dataset.chunk_count(chunk_tokens)))
    assert all(c.dtype == numpy.uint16 and len(c) == chunk_tokens for _, c in chunks[:-1])
    numpy.testing.assert_array_equal(numpy.concatenate([c for _, c in chunks]), stream)


def test_chunk_inside_one_shard_is_a_view_of_the_file(tmp_path: Path) -> None:
    paths, _ = _three_shards(tmp_path)
    dataset = Dataset(paths)
    first = dataset.chunk(0, 500)
    assert isinstance(first.base, numpy.memmap) or isinstance(first, numpy.memmap)
    with pytest.raises(IndexError):
        dataset.chunk(8, 500)


def test_manifest_is_msgpackable_and_commits_to_blake3_of_the_tokens(tmp_path: Path) -> None:
    paths, stream = _three_shards(tmp_path)
    manifest = Dataset(paths, name="h0").manifest()
    assert msgpack.unpackb(msgpack.packb(manifest)) == manifest
    assert manifest == {
        "name": "h0",
        "total_tokens": 3501,
        "token_dtype": "uint16",
        "max_token": int(stream.max()),
        "digest_alg": "blake3",
        "digest": blake3.blake3(stream.astype("<u2").tobytes()).hexdigest(),
    }


def test_max_token_is_the_largest_id_over_every_file_raw_and_empty(tmp_path: Path) -> None:
    paths, stream = _three_shards(tmp_path)
    assert Dataset(paths).max_token == int(stream.max())
    raw = tmp_path / "raw.txt"
    raw.write_bytes(b"abc\xfe")
    assert Dataset([raw], raw=True).max_token == 0xFE
    empty = write_shard(tmp_path / "empty.bin", numpy.zeros(0, dtype=numpy.uint16))
    assert Dataset([empty]).max_token == -1


def test_digest_changes_with_any_token(tmp_path: Path) -> None:
    tokens = _tokens(4096, 9)
    base = Dataset([write_shard(tmp_path / "base.bin", tokens)]).digest()
    for position in (0, 1, 2047, 4095):
        for delta in (1, 256):
            changed = tokens.copy()
            changed[position] ^= delta
            path = write_shard(tmp_path / f"c{position}-{delta}.bin", changed)
            assert Dataset([path]).digest() != base, (position, delta)
    shorter = write_shard(tmp_path / "short.bin", tokens[:-1])
    assert Dataset([shorter]).digest() != base


def test_raw_file_and_its_shard_commit_alike(tmp_path: Path) -> None:
    text = b"def f(x):\n    return x + 1\n" * 50
    (tmp_path / "src.py").write_bytes(text)
    shard = write_shard(tmp_path / "src.bin", numpy.frombuffer(text, dtype=numpy.uint8))
    raw = Dataset([tmp_path / "src.py"], raw=True)
    assert raw.digest() == Dataset([shard]).digest()
    numpy.testing.assert_array_equal(raw.chunk(1, 100), read_shard(shard)[100:200])


def test_dataset_checks_every_file_up_front(tmp_path: Path) -> None:
    paths, _ = _three_shards(tmp_path)
    (tmp_path / "bad.bin").write_bytes(b"junk")
    with pytest.raises(ShardError, match="bad.bin"):
        Dataset([*paths, tmp_path / "bad.bin"])
    with pytest.raises(ShardError, match="names no files"):
        Dataset([])
    with pytest.raises(ValueError):
        Dataset(paths).chunk_count(0)
