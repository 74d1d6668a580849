"""Class 10: honest mistakes fail at registration, with one line naming the remedy, not hop by hop."""

from __future__ import annotations

from typing import Any

import numpy
import pytest
from travel_kit import HANG, Travel

from gtbus.training.corpus import build_demo_corpus
from gtbus.training.shards import write_shard

pytestmark = pytest.mark.slow


def _last_line(t: Travel, name: str) -> str:
    return t.stderr(name).rstrip().splitlines()[-1]


def test_gpt2_token_shard_against_a_byte_model_is_refused_at_registration(travel: Any, tmp_path: Any) -> None:
    honest = build_demo_corpus(tmp_path / "corpus", holders=1, bytes_per_holder=8192)[0]
    gpt2 = write_shard(tmp_path / "gpt2.bin", numpy.arange(8192, dtype=numpy.uint16) * 6 % 50257)
    t: Travel = travel(holders=2, chunk_tokens=4096, data=[honest, gpt2]).start()
    rc = t.holder("h2").wait(timeout=HANG)
    assert rc == 1
    # One line naming the remedy, and no value from the data in it.
    assert _last_line(t, "h2") == (
        "Error: h2: registration refused: the data holds token ids beyond the vocabulary "
        "of 256 of trainer bytelm; start the orchestrator with --trainer gpt2"
    )
    assert "refused the registration of h2" in t.stderr()
    # Nothing was granted to h2, nothing of its data reached the device.
    assert not [m for m in t.messages() if m.type == "token.grant" and m.recipient == "h2"]


def test_a_holder_expecting_another_chunk_size_says_so_at_registration(travel: Any) -> None:
    t: Travel = travel(holders=1, chunk_tokens=4096, bytes_per_holder=8192, extra_holder_args=("--chunk-tokens", "1000"))
    t.start()
    assert t.holder("h1").wait(timeout=HANG) == 1
    assert _last_line(t, "h1") == "Error: h1: this run uses chunks of 4096 tokens, not --chunk-tokens 1000; drop the option to take the run's"
