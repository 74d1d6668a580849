"""The orchestrator's side of hops prepared ahead (gtbus.nodes.hop_prepare), on the real host device and staging pool.

A prepared hop is taken only by the hop it was made for (same holder and
chunk, same staging size); any other hop releases it unused, so a staging
named to one holder is never granted to another. The end-to-end run with real
processes (every hop after the first prepared, the holders writing through what
they prepared) is in test_travel_loop.py; hostile preparations against a real
holder are in tests/hostile/test_prepared_hop_holder.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
from nacl.public import PrivateKey
from travel_kit import Travel

from gtbus.errors import ChannelError
from gtbus.gpu.host import HostDevice
from gtbus.gpu.sealing import open_params
from gtbus.nodes.hop_prepare import PrepareCounts, prepare_hop, release_prepared, take_prepared
from gtbus.nodes.lane import Lane
from gtbus.nodes.run_config import RunConfig
from gtbus.nodes.staging_pool import MAX_RETIRED, StagingPool
from gtbus.protocol.schedule import Assignment
from gtbus.protocol.token import TokenMachine


class MappingSensitiveHostDevice(HostDevice):
    """The host device, declared unable to free staging under a holder's mapping (as cupy: CUDA IPC); it notes what it frees."""

    frees_staging_while_mapped = False

    def __init__(self) -> None:
        super().__init__()
        self.freed: list[Any] = []

    def release(self, buf: Any) -> None:
        self.freed.append(buf)
        super().release(buf)


@pytest.fixture
def lane(tmp_path: Path) -> Iterator[Lane]:
    dev = HostDevice()
    yield Lane(0, TokenMachine(), dev, trainer=None, staging=StagingPool(dev, tmp_path))  # type: ignore[arg-type]
    dev.close()


@pytest.fixture
def sensitive_lane(tmp_path: Path) -> Iterator[Lane]:
    dev = MappingSensitiveHostDevice()
    yield Lane(0, TokenMachine(), dev, trainer=None, staging=StagingPool(dev, tmp_path))  # type: ignore[arg-type]
    dev.close()


def _config(tmp_path: Path, chunk_tokens: int = 4096) -> RunConfig:
    return RunConfig(run_dir=tmp_path, holders=["h1", "h2"], chunk_tokens=chunk_tokens)


def test_a_prepared_hop_is_sealed_to_its_holder_and_taken_by_its_hop(lane: Lane, tmp_path: Path) -> None:
    cfg, key, counts = _config(tmp_path), PrivateKey.generate(), PrepareCounts()
    lane.prepared = p = prepare_hop(lane, Assignment(0, "h1", 3), cfg, bytes(key.public_key))
    opened = open_params(p.sealed, bytes(key))
    assert opened == p.params and opened.buffer_handle == str(p.handle) and p.staging.nbytes == cfg.staging_bytes
    assert take_prepared(lane, Assignment(0, "h1", 3), cfg.staging_bytes, counts) is p
    assert lane.prepared is None and counts.as_dict() == {"made": 0, "used": 1, "discarded": 0}
    assert not p.staging.released  # the hop owns it now: scrubbed and released in its epilogue


@pytest.mark.parametrize("other", [Assignment(0, "h2", 3), Assignment(0, "h1", 4)], ids=["other holder", "other chunk"])
def test_a_wrong_guess_is_released_unused_never_granted_to_another(lane: Lane, tmp_path: Path, other: Assignment) -> None:
    cfg, counts = _config(tmp_path), PrepareCounts()
    lane.prepared = p = prepare_hop(lane, Assignment(0, "h1", 3), cfg, bytes(PrivateKey.generate().public_key))
    assert take_prepared(lane, other, cfg.staging_bytes, counts) is None
    assert p.staging.released and lane.prepared is None
    assert counts.as_dict() == {"made": 0, "used": 0, "discarded": 1}
    # The next hop's own staging is another buffer with another handle.
    buf, handle = lane.staging.take_staging(cfg.staging_bytes)
    assert str(handle) != str(p.handle)
    lane.staging.release_staging(buf, handle)


def test_a_prepared_hop_of_another_size_is_released(lane: Lane, tmp_path: Path) -> None:
    cfg, counts = _config(tmp_path), PrepareCounts()
    lane.prepared = p = prepare_hop(lane, Assignment(0, "h1", 0), cfg, bytes(PrivateKey.generate().public_key))
    assert take_prepared(lane, Assignment(0, "h1", 0), _config(tmp_path, chunk_tokens=8192).staging_bytes, counts) is None
    assert p.staging.released and counts.discarded == 1


def test_the_runs_end_releases_what_no_hop_took(lane: Lane, tmp_path: Path) -> None:
    cfg, counts = _config(tmp_path), PrepareCounts()
    release_prepared(lane, counts)  # nothing prepared: nothing to do
    assert counts.discarded == 0
    lane.prepared = p = prepare_hop(lane, Assignment(0, "h2", 1), cfg, bytes(PrivateKey.generate().public_key))
    release_prepared(lane, counts)
    assert p.staging.released and lane.prepared is None and counts.discarded == 1
    assert take_prepared(lane, Assignment(0, "h2", 1), cfg.staging_bytes, counts) is None


def test_a_bad_holder_key_leaves_no_staging_taken(lane: Lane, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    released: list[str] = []
    keep = lane.staging.release_staging
    lane.staging.release_staging = lambda buf, handle: (released.append(str(handle)), keep(buf, handle))[1]  # type: ignore[method-assign]
    with pytest.raises(ChannelError, match="must be 32 bytes"):
        prepare_hop(lane, Assignment(0, "h1", 0), cfg, b"short")
    assert lane.prepared is None and len(released) == 1  # the staging it took went back at once


def test_no_prepare_sends_no_preparation(travel: Any) -> None:
    # gtbus orchestrator --no-prepare: every hop makes its own staging and key at its start, as before preparations.
    t: Travel = travel(holders=2, chunk_tokens=16384, bytes_per_holder=32 * 1024, extra_orchestrator_args=["--no-prepare"]).start()
    summary = t.finish()
    assert summary["hops_trained"] == summary["hops"] == 4
    assert summary["prepared_hops"] == {"made": 0, "used": 0, "discarded": 0}
    assert not [m for m in t.messages() if m.type == "token.prepare"]
    assert not any("prepared ahead" in t.stderr(name) for name in t.holder_names)


def test_where_freeing_under_a_mapping_is_unsafe_a_wrong_guess_waits_for_its_holder_to_let_go(sensitive_lane: Lane, tmp_path: Path) -> None:
    lane, cfg, counts = sensitive_lane, _config(tmp_path), PrepareCounts()
    key = bytes(PrivateKey.generate().public_key)
    lane.prepared = p = prepare_hop(lane, Assignment(0, "h1", 3), cfg, key)
    assert take_prepared(lane, Assignment(0, "h2", 0), cfg.staging_bytes, counts) is None
    freed = lane.device.freed  # type: ignore[attr-defined]
    assert p.staging not in freed and lane.staging.retired == 1  # h1 may still map it: kept (scrubbed)
    lane.staging.free_retired("h2")  # another holder's ack says nothing about h1's mapping
    assert p.staging not in freed
    lane.staging.free_retired("h1")  # h1 acked a later grant: it let go
    assert p.staging in freed and lane.staging.retired == 0


def test_retired_stagings_are_bounded_and_all_freed_at_the_runs_end(sensitive_lane: Lane, tmp_path: Path) -> None:
    lane, cfg, counts = sensitive_lane, _config(tmp_path), PrepareCounts()
    key = bytes(PrivateKey.generate().public_key)
    made = []
    for chunk in range(MAX_RETIRED + 2):
        lane.prepared = p = prepare_hop(lane, Assignment(0, "h1", chunk), cfg, key)
        made.append(p)
        assert take_prepared(lane, Assignment(0, "h2", chunk), cfg.staging_bytes, counts) is None
    freed = lane.device.freed  # type: ignore[attr-defined]
    assert lane.staging.retired == MAX_RETIRED
    assert [q.staging in freed for q in made] == [True, True] + [False] * MAX_RETIRED  # the oldest went first
    lane.prepared = last = prepare_hop(lane, Assignment(0, "h3", 0), cfg, key)
    release_prepared(lane, counts)  # the run's end: retired too, then every spare freed
    lane.staging.release_spares()
    assert lane.staging.retired == 0 and all(q.staging in freed for q in [*made, last])
