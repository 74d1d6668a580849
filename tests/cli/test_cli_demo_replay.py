"""Nodes started from the CLI as separate processes exchange signed messages over CURVE; `gtbus replay` checks the logs.

One tiny `gtbus demo` run (orchestrator + 2 holders, each its own process on
loopback) is shared by the module; tampering tests work on copies of its logs.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import msgpack
import pytest

from gtbus.recording import LogRecord, read_log
from gtbus.replay.verify import header_of

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "replay"))
import logkit  # noqa: E402  (the log forger shared with the replay tests)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "export"))
from export_kit import gtbus as gtbus_process  # noqa: E402  (the real command, in its own process)
from export_kit import run_demo  # noqa: E402
from export_kit import gtbus_here as gtbus  # noqa: E402  (the same through click's runner, in this process)

pytestmark = pytest.mark.slow

DEMO_ARGS = ["--kib-per-holder", "64", "--rounds", "1", "--chunk-tokens", "16384", "--steps", "5", "--holders", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("demo") / "run"
    shown = run_demo(run, *DEMO_ARGS, timeout=180).stdout
    # 2 holders x 4 chunks: every hop after the first prepared ahead, and the demo says so.
    assert "prepared ahead      7 of 8 hops" in shown, shown[-1500:]
    return run


@pytest.fixture
def logs(run_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the run's logs, free to damage."""
    return Path(shutil.copytree(run_dir / "logs", tmp_path / "logs"))


def msgs(path: Path) -> list[LogRecord]:
    return [r for r in read_log(path) if r.kind == "msg"]


def typed(path: Path) -> list[tuple[LogRecord, str]]:
    out = []
    for r in msgs(path):
        h = header_of(r)
        assert h is not None
        out.append((r, h.type))
    return out


# -- the run itself --------------------------------------------------------------------------------


def test_processes_exchanged_signed_messages(run_dir: Path) -> None:
    logs = run_dir / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["h1.gtlog", "h2.gtlog", "orch.gtlog"]
    orch_in = {tuple(r.frames) for r in msgs(logs / "orch.gtlog") if r.data["verdict"] == "accepted"}
    orch_out = {tuple(r.frames) for r in msgs(logs / "orch.gtlog") if r.data["verdict"] == "sent"}
    for holder in ("h1", "h2"):
        recs = typed(logs / f"{holder}.gtlog")
        # Each process ran under its own pid (separate processes, not one).
        metas = [r for r in read_log(logs / f"{holder}.gtlog") if r.kind == "meta"]
        assert metas and metas[0].data["node"] == holder
        sent = [(r, t) for r, t in recs if r.data["verdict"] == "sent" and t != "heartbeat"]
        got = [(r, t) for r, t in recs if r.data["verdict"] == "accepted"]
        assert {t for _, t in sent} >= {"register", "token.ack", "token.return"}
        assert {t for _, t in got} >= {"welcome", "token.grant", "token.state", "run.complete"}
        # What the holder signed and sent, the orchestrator received byte for byte and accepted; and back.
        assert all(tuple(r.frames) in orch_in for r, _ in sent)
        assert all(tuple(r.frames) in orch_out for r, t in got)
        assert all(r.data["peer"] is None for r, _ in got)  # client side: the pinned server
    pids = {r.data["pid"] for p in logs.iterdir() for r in read_log(p) if r.kind == "meta"}
    assert len(pids) == 3
    assert all(r.data["peer"] in ("h1", "h2") for r in msgs(logs / "orch.gtlog") if r.data["verdict"] == "accepted")
    assert not [r for p in logs.iterdir() for r in msgs(p) if r.data["verdict"].startswith("rejected")]


def test_replay_verify_ok(run_dir: Path) -> None:
    p = gtbus_process("replay", "--verify", run_dir / "logs")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("ok ") for line in lines)
    assert p.stderr == ""
    # Against the deployment's key folder instead of the rosters the logs recorded.
    assert gtbus("replay", "--verify", run_dir / "logs", "--keys", run_dir / "keys").returncode == 0


def test_replay_verify_against_other_keys_fails(run_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    for name, role in (("orch", "orchestrator"), ("h1", "holder"), ("h2", "holder")):
        assert gtbus("keygen", name, "--role", role, "--out", other).returncode == 0
    p = gtbus("replay", "--verify", run_dir / "logs", "--keys", other)
    assert p.returncode == 1
    fails = p.stderr.splitlines()
    # The first thing each log's signer vouched for, its opening checkpoint, does not verify with these keys.
    assert len(fails) == 3 and all("record 1 " in f and "checkpoint signature does not verify" in f for f in fails), p.stderr


def test_replay_filters_by_node_and_type(run_dir: Path) -> None:
    logs = run_dir / "logs"
    want = [r for r, t in typed(logs / "h1.gtlog") if t.startswith("token.")]
    assert want
    p = gtbus("replay", logs, "--node", "h1", "--type", "token")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == len(want)
    for line in lines:
        _, node, _, _, mtype, *_ = line.split()
        assert node == "h1" and mtype.startswith("token."), line
    js = [json.loads(line) for line in gtbus("replay", logs, "--node", "h1", "--type", "token", "--json").stdout.splitlines()]
    assert len(js) == len(want)
    assert all(e["node"] == "h1" and e["type"].startswith("token.") for e in js)
    assert {e["type"] for e in js} >= {"token.grant", "token.ack", "token.return", "token.state"}
    # A family name matches at a dot only; an exact type matches exactly.
    assert gtbus("replay", logs, "--node", "h1", "--type", "tok").stdout == ""
    exact = gtbus("replay", logs, "--node", "h2", "--type", "token.grant", "--json").stdout.splitlines()
    assert exact and all(json.loads(line)["type"] == "token.grant" and json.loads(line)["node"] == "h2" for line in exact)


# -- damaged logs ------------------------------------------------------------------------------


def _flip(path: Path, pos: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= mask
    path.write_bytes(bytes(data))


def _record_of(path: Path, mtype: str, verdict: str) -> LogRecord:
    for r, t in typed(path):
        if t == mtype and r.data["verdict"] == verdict:
            return r
    raise AssertionError(f"no {verdict} {mtype} in {path}")


def _payload_pos(path: Path, rec: LogRecord, needle: bytes) -> int:
    """File offset of ``needle`` inside record ``rec``'s msgpack payload."""
    data = path.read_bytes()
    start = rec.offset + 4
    i = data.find(needle, start, start + rec.length)
    assert i >= 0, needle
    return i


def _verify_fails_naming(logs: Path, rec: LogRecord, *why: str, process: bool = False) -> str:
    p = (gtbus_process if process else gtbus)("replay", "--verify", logs)
    assert p.returncode == 1, p.stdout
    assert "Traceback" not in p.stderr
    fails = p.stderr.splitlines()
    assert len(fails) == 1, p.stderr
    assert fails[0].startswith("FAIL ") and "h1.gtlog" in fails[0]
    assert f"record {rec.index} " in fails[0], (rec.index, fails[0])
    for w in why:
        assert w in fails[0], fails[0]
    assert len(p.stdout.splitlines()) == 2  # the other two logs still verify
    return fails[0]


@pytest.mark.parametrize(
    "where",
    ["signed header", "signed body", "signature", "local verdict", "local time", "length prefix low", "length prefix high", "chain digest"],
)
def test_one_flipped_byte_is_found_and_named(logs: Path, where: str) -> None:
    log = logs / "h1.gtlog"
    rec = _record_of(log, "token.return", "sent")
    if where == "signed header":
        hb = rec.frames[1]
        pos = _payload_pos(log, rec, hb) + len(hb) // 2
    elif where == "signed body":
        bb = rec.frames[2]
        pos = _payload_pos(log, rec, bb) + len(bb) - 3
    elif where == "signature":
        pos = _payload_pos(log, rec, rec.frames[3]) + 10
    elif where == "local verdict":
        pos = _payload_pos(log, rec, b"sent") + 1
    elif where == "local time":
        pos = _payload_pos(log, rec, msgpack.packb(rec.data["t"])) + 6
    elif where == "length prefix low":
        pos = rec.offset + 3
    elif where == "length prefix high":
        pos = rec.offset
    else:
        pos = rec.offset + 4 + rec.length + 5
    _flip(log, pos, 0x80 if where == "length prefix high" else 0x01)
    _verify_fails_naming(logs, rec, process=where == "signed body")


_edit = logkit.edit


def test_rechained_edit_of_a_signed_frame_fails_its_signature(logs: Path) -> None:
    log = logs / "h1.gtlog"
    rec = _record_of(log, "token.grant", "accepted")

    def edit(records: list[dict]) -> None:  # type: ignore[type-arg]
        frames = list(records[rec.index]["frames"])
        body = bytearray(frames[2])
        body[-1] ^= 1
        frames[2] = bytes(body)
        records[rec.index]["frames"] = frames

    _edit(log, edit)
    _verify_fails_naming(logs, rec, "bad-signature", "token.grant from orch")


def test_rechained_reorder_breaks_the_sequence(logs: Path) -> None:
    log = logs / "h1.gtlog"
    grants = [r for r, t in typed(log) if t == "token.grant"]
    a, b = grants[0], grants[1]

    def edit(records: list[dict]) -> None:  # type: ignore[type-arg]
        records[a.index], records[b.index] = records[b.index], records[a.index]

    _edit(log, edit)
    # The second grant, now first, makes the next record of the stream orch->h1 (the first
    # grant in its new place, or a direct message between the two) go back; unless a signed
    # checkpoint between them (one a second) sees the swap first.
    p = gtbus("replay", "--verify", logs)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, p.stderr
    found = int(p.stderr.split(": record ")[1].split()[0])
    assert a.index < found <= b.index, (a.index, b.index, p.stderr)
    assert "sequence goes back in stream orch->h1" in p.stderr or "checkpoint does not match the records before it" in p.stderr


def test_rechained_received_record_passed_off_as_sent(logs: Path) -> None:
    log = logs / "h1.gtlog"
    rec = _record_of(log, "welcome", "accepted")

    def edit(records: list[dict]) -> None:  # type: ignore[type-arg]
        records[rec.index]["dir"] = "out"

    _edit(log, edit)
    _verify_fails_naming(logs, rec, "claims sender 'orch'")


def test_unchanged_rechain_still_verifies(logs: Path) -> None:
    """The re-chaining helper itself is faithful (so the failures above come from the edits)."""
    _edit(logs / "h1.gtlog", lambda records: None)
    assert gtbus("replay", "--verify", logs).returncode == 0


@pytest.mark.parametrize(
    "field, value, why",
    [("frames", 5, "field 'frames'"), ("frames", None, "field 'frames'"), ("frames", [1, 2, 3, 4], "field 'frames'"),
     ("frames", ["a", "b", "c", "d"], "field 'frames'"), ("t", "noon", "field 't'"), ("t", float("nan"), "field 't'"),
     ("verdict", b"accepted", "field 'verdict'"), ("dir", b"out", "field 'dir'"), ("extra", 1, "unexpected field 'extra'"),
     ("t", 1e300, "checkpoint does not match")],
)
def test_rechained_record_of_the_wrong_shape_is_one_error_not_a_crash(logs: Path, field: str, value: object, why: str) -> None:
    """A log edited on purpose (and re-chained) may hold anything: one line naming the record, never a traceback."""
    log = logs / "h1.gtlog"
    rec = _record_of(log, "token.return", "sent")

    def edit(records: list[dict]) -> None:  # type: ignore[type-arg]
        records[rec.index][field] = value

    _edit(log, edit)
    if why.startswith("checkpoint"):  # well-formed, but not what h1 signed a checkpoint over
        fail = gtbus("replay", "--verify", log)
        assert fail.returncode == 1 and why in fail.stderr and len(fail.stderr.splitlines()) == 1
        assert gtbus("replay", log).returncode == 0  # showing it is fine; proving it is not
        return
    _verify_fails_naming(logs, rec, why)
    for args in ([], ["--json"], ["--type", "token"], ["--redrive", "h1"]):
        p = gtbus("replay", log, *args)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        errors = p.stderr.splitlines()
        assert len(errors) == 1 and errors[0].startswith("Error: ") and f"record {rec.index} " in errors[0] and why in errors[0], p.stderr
