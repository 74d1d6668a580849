"""``gtbus data``: build and inspect the token files holders train from.

Text becomes tokens one byte per token (the built-in byte-level model's
vocabulary). Every failure is one line naming the file or option at fault.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import click
import numpy

from gtbus.training.corpus import DEFAULT_BYTES_PER_HOLDER, build_demo_corpus
from gtbus.training.shards import (
    HEADER_BYTES,
    MAX_SHARD_TOKENS,
    Dataset,
    ShardError,
    read_shard_header,
    write_shard,
)

data = click.Group(name="data", help="Build and inspect token shards and raw token files.")


@data.command("build")
@click.argument("sources", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Output file; with --demo-corpus, the output directory.")
@click.option("--raw", is_flag=True,
              help="Write the bytes as a raw token file (one token per byte) instead of an llm.c shard.")
@click.option("--demo-corpus", is_flag=True,
              help="Build one shard per holder from this Python's standard library instead of SOURCES.")
@click.option("--holders", type=click.IntRange(min=1), default=3, show_default=True,
              help="Holders to split the demo corpus among (disjointly, by file).")
@click.option("--bytes-per-holder", type=click.IntRange(min=1), default=DEFAULT_BYTES_PER_HOLDER,
              show_default=True, help="Cap on each holder's demo shard.")
def build(sources: tuple[Path, ...], out: Path, raw: bool, demo_corpus: bool, holders: int,
          bytes_per_holder: int) -> None:
    """Byte-tokenize SOURCES (files, or directories walked in sorted order) into one shard at --out."""
    if demo_corpus:
        if sources or raw:
            raise click.ClickException("--demo-corpus takes no SOURCES and no --raw")
        try:
            paths = build_demo_corpus(out, holders=holders, bytes_per_holder=bytes_per_holder)
        except (OSError, ShardError) as err:
            raise click.ClickException(_one_line(err)) from None
        for path in paths:
            _echo_written(path, raw=False)
        return
    if not sources:
        raise click.ClickException("no SOURCES given (or use --demo-corpus)")
    files = _expand(sources)
    if not files:
        raise click.ClickException("SOURCES contain no files")
    try:
        payload = b"".join(path.read_bytes() for path in files)
    except OSError as err:
        raise click.ClickException(_one_line(err)) from None
    try:
        if raw:
            out.write_bytes(payload)
        else:
            if len(payload) > MAX_SHARD_TOKENS:
                raise click.ClickException(
                    f"{len(payload)} bytes exceed one shard's {MAX_SHARD_TOKENS} tokens; split SOURCES"
                )
            write_shard(out, numpy.frombuffer(payload, dtype=numpy.uint8))
    except (OSError, ShardError) as err:
        raise click.ClickException(_one_line(err)) from None
    _echo_written(out, raw=raw, files=len(files))


@data.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--raw", is_flag=True, help="PATH is a raw token file (one token per byte).")
@click.option("--chunk-tokens", type=click.IntRange(min=1), default=None,
              help="Also report how many chunks of this many tokens PATH makes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect_command(path: Path, raw: bool, chunk_tokens: int | None, as_json: bool) -> None:
    """Check PATH and print its header, token count and BLAKE3 digest."""
    try:
        report = _describe(path, raw=raw, chunk_tokens=chunk_tokens)
    except ShardError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(json.dumps(report, sort_keys=True))
        return
    for key, value in report.items():
        click.echo(f"{key:>12}: {value}")


def _describe(path: Path, *, raw: bool, chunk_tokens: int | None) -> dict[str, object]:
    report: dict[str, object] = {"path": str(path), "format": "raw" if raw else "llm.c shard"}
    if not raw:
        header = read_shard_header(path)
        report.update(magic=header.magic, version=header.version, header_bytes=HEADER_BYTES)
    dataset = Dataset([path], raw=raw, name=path.name)
    report["tokens"] = dataset.total_tokens
    if dataset.total_tokens:
        tokens = dataset.chunk(0, dataset.total_tokens)
        report.update(min_token=int(tokens.min()), max_token=int(tokens.max()))
    if chunk_tokens is not None:
        report.update(chunk_tokens=chunk_tokens, chunk_count=dataset.chunk_count(chunk_tokens))
    report.update(digest_alg="blake3", digest=dataset.digest().hex())
    return report


def _expand(sources: Iterable[Path]) -> list[Path]:
    """Files named directly, then each directory's files in sorted order; hidden entries inside directories are skipped."""
    files: list[Path] = []
    for source in sources:
        if source.is_file():
            files.append(source)
        elif source.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(source):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                found.extend(Path(dirpath, f) for f in filenames if not f.startswith("."))
            files.extend(sorted(p for p in found if p.is_file()))
        elif source.exists():
            raise click.ClickException(f"{source}: not a regular file or directory")
        else:
            raise click.ClickException(f"{source}: no such file or directory")
    return files


def _echo_written(path: Path, *, raw: bool, files: int | None = None) -> None:
    dataset = Dataset([path], raw=raw, name=path.name)
    origin = f" from {files} files" if files is not None else ""
    click.echo(f"wrote {path}: {dataset.total_tokens} tokens{origin}, blake3 {dataset.digest().hex()}")


def _one_line(err: Exception) -> str:
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror}"
    return str(err).splitlines()[0] if str(err) else type(err).__name__
