"""Class 7: offline tools trust nothing in the file.

The logs of one real deployment (orchestrator and two holders as processes)
are copied and attacked the way someone holding the files but not the nodes'
secret keys would: decode bombs, records dropped and the chain recomputed, a
roster appended with records forged under it, and random field values in every
field of every record (re-chained), and in every field of the signed bodies
(re-signed with the real key, so only the tools' own checks stand between the
value and a traceback). Every outcome is exit 0 or one ``Error:``/``FAIL``
line, never a traceback, and no raw control character reaches the terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gtbus.cli.main import main
from gtbus.messages.envelope import blob_digest, signing_input_digest
from gtbus.messages.identity import NodeIdentity, Role, Roster, load_identity
from gtbus.messages.signer import MessageSigner
from gtbus.messages.types import Echo
from gtbus.recording import CHAIN, LOG_MAGIC, MAX_RECORD, read_log
from gtbus.replay.verify import header_of, verify_log

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "nodes"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "replay"))
from logkit import edit, rechain  # noqa: E402
from travel_kit import Travel  # noqa: E402

# Peak RSS of one `gtbus replay` process on any crafted log (measured ~40 MiB, the same as on a real run's logs).
RSS_CAP = 96 << 20
RAW_CONTROLS = [chr(c) for c in range(0x20) if c != 0x0A] + ["\x7f", "\x9b", "\u202e", "\u2028"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Travel]:
    t = Travel(tmp_path_factory.mktemp("offline") / "run", holders=2)
    try:
        t.start().finish()
        yield t
    finally:
        t.close()


@pytest.fixture
def logs(run: Travel, tmp_path: Path) -> Path:
    """A private copy of the run's logs, free to attack."""
    return Path(shutil.copytree(run.logs, tmp_path / "logs"))


def replay(*args: str | Path) -> tuple[int, str, str]:
    """`gtbus replay ARGS` in this process; a Python exception escaping it fails the test."""
    r = CliRunner().invoke(main, ["replay", *map(str, args)])
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{type(r.exception).__name__}: {r.exception}"
    return r.exit_code, r.stdout, r.stderr


def assert_clean(code: int, out: str, err: str, as_json: bool = False, finding: str = "FAIL ") -> None:
    """Exit 0, or 1 with one line naming the problem (or, for --verify --json, the failures in the JSON); nothing raw for the terminal."""
    assert code in (0, 1), (code, err)
    assert "Traceback" not in err
    if code == 1 and as_json and not err:
        assert any(not r["ok"] for r in json.loads(out))
    elif code == 1:
        lines = err.splitlines()
        assert lines and all(line.startswith(("Error: ", finding)) for line in lines), err
        assert len([line for line in lines if line.startswith("Error: ")]) <= 1, err
    assert not any(c in out + err for c in RAW_CONTROLS)


def every_view(path: Path, node: str) -> None:
    for args in ([], ["--json"], ["--verify"], ["--verify", "--json"], ["--type", "token"], ["--epoch", "1:3"], ["--redrive", node]):
        # A finding is a FAIL line per log (verify) or the first differing decision (redrive: "NODE: ...").
        assert_clean(*replay(path, *args), as_json=args == ["--verify", "--json"], finding=f"{node}: " if "--redrive" in args else "FAIL ")


# The measured process writes its own peak (VmHWM of its address space) when it exits.
# Not wait4's ru_maxrss: Linux carries the pre-exec high-water mark of the forked copy of
# this pytest process into it, so it read 300 MiB once pytest itself had grown that big.
_MEASURED = """
import atexit, sys
out = sys.argv.pop(1)
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            with open(out, "w") as fh:
                fh.write(line.split()[1])
atexit.register(peak)
from gtbus.cli.main import main
main()
"""


def measured(*args: str | Path) -> tuple[int, str, int]:
    """Run `gtbus replay ARGS` as a process: exit status, stderr, peak RSS in bytes (its own VmHWM)."""
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak"
        p = subprocess.run([sys.executable, "-c", _MEASURED, str(peak), "replay", *map(str, args)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
        return p.returncode, p.stderr.decode(), int(peak.read_text()) * 1024

def _raw_log(path: Path, payload: bytes) -> None:
    import blake3

    h = blake3.blake3(bytes(CHAIN))
    h.update(payload)
    path.write_bytes(LOG_MAGIC + len(payload).to_bytes(4, "big") + payload + h.digest(CHAIN))


# -- the real logs verify --------------------------------------------------------------------------


def test_real_logs_verify_signed_and_closed(run: Travel) -> None:
    for p in run.logs.glob("*.gtlog"):
        rep = verify_log(p, Roster.from_dir(run.dep.keys))
        assert rep.ok and rep.unsigned_tail == 0 and rep.closed, (p, rep)


# -- decode bombs ------------------------------------------------------------------------------------


BOMBS = {
    # One array claiming two million elements, each an empty array: gigabytes of lists if built.
    "wide": b"\xdd" + (MAX_RECORD - 5).to_bytes(4, "big") + b"\x90" * (MAX_RECORD - 5),
    # 100,000 nested arrays: RecursionError in anything that walks it.
    "deep": b"\x91" * 100_000 + b"\xc0",
    # A map of 60,000 keys, each to an empty array.
    "many": b"\xdf" + (60_000).to_bytes(4, "big") + b"".join(msgpack.packb(f"k{i}") + b"\x90" for i in range(60_000)),
    # Under every count, but each member map nested one level too deep.
    "nested-roster": msgpack.packb({"kind": "meta", "node": "orch", "t": 1.0, "pid": 1, "roster": [{"name": [["x"]]}] * 3000}),
}


@pytest.mark.parametrize("bomb", [*BOMBS, "length-prefix"])
def test_decode_bombs_are_one_error_and_cost_little_memory(tmp_path: Path, bomb: str) -> None:
    log = tmp_path / f"{bomb}.gtlog"
    if bomb == "length-prefix":  # 4 GiB claimed: refused before anything is read
        log.write_bytes(LOG_MAGIC + b"\xff\xff\xff\xff" + b"x" * 64)
    else:
        _raw_log(log, BOMBS[bomb])
    for args in (["--verify"], []):
        code, err, rss = measured(*args, log)
        assert code == 1 and len(err.splitlines()) == 1 and "record 0 at byte 7" in err, err
        assert rss < RSS_CAP, f"{bomb} {args}: peak RSS {rss >> 20} MiB"


def test_a_body_nested_a_thousand_deep_is_shown_in_one_line(logs: Path) -> None:
    log = logs / "h1.gtlog"
    i = next(r.index for r in read_log(log) if r.kind == "msg" and r.data["verdict"] == "accepted")

    def change(records: list[dict[str, Any]]) -> None:
        frames = list(records[i]["frames"])
        frames[2] = b"\x81\xa1a" * 900 + b"\xc0"  # {"a": {"a": ... }} 900 deep
        records[i]["frames"] = frames

    edit(log, change)
    code, out, err = replay(log)
    assert code == 0 and len(out.splitlines()) == sum(1 for r in read_log(log) if r.kind == "msg")
    every_view(log, "h1")


# -- dropped, reordered, appended ----------------------------------------------------------------


def test_dropping_records_and_recomputing_the_chain_is_found(logs: Path) -> None:
    log = logs / "orch.gtlog"
    grant = next(r.index for r in read_log(log) if (h := header_of(r)) is not None and h.type == "token.grant")

    def drop(records: list[dict[str, Any]]) -> None:
        del records[grant]

    edit(log, drop)
    code, _, err = replay("--verify", log)
    assert code == 1 and "checkpoint does not match the records before it" in err, err


def test_a_roster_appended_mid_log_with_forged_records_is_refused(logs: Path, run: Travel) -> None:
    """The attacker appends a restart whose roster swaps h1's key for its own, and an 'accepted' echo signed with it."""
    log = logs / "orch.gtlog"
    mallory = NodeIdentity.generate("h1", Role.HOLDER)
    real = Roster.from_dir(run.dep.keys)
    evil = Roster([mallory.public if m.name == "h1" else m for m in real])
    payloads = [msgpack.packb(r.data, use_bin_type=True) for r in read_log(log)]
    meta = {"kind": "meta", "node": "orch", "t": 2e9, "pid": 1, "roster": [m.to_json() for m in evil]}
    _, frames = MessageSigner(mallory).sign(Echo(b"x", "I was trained"), "orch")
    forged = {"kind": "msg", "dir": "in", "t": 2e9, "verdict": "accepted", "peer": "h1", "ch": "direct", "frames": frames}
    rechain(log, payloads + [msgpack.packb(meta, use_bin_type=True), msgpack.packb(forged, use_bin_type=True)])
    for keys in ([], ["--keys", run.dep.keys]):
        code, _, err = replay("--verify", log, *keys)
        assert code == 1 and f"record {len(payloads) + (1 if keys else 0)} " in err, err
    assert "not vouched for" in replay("--verify", log)[2]


# -- random values in every field --------------------------------------------------------------------


WIRE_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
HOSTILE = st.one_of(
    st.none(), st.booleans(), WIRE_INT,
    st.floats(allow_nan=True, allow_infinity=True), st.binary(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.lists(WIRE_INT, max_size=5), st.lists(st.binary(max_size=8), max_size=6),
    st.dictionaries(st.text(max_size=5), WIRE_INT, max_size=3),
    st.sampled_from(["\x1b[2J\n2099 FORGED", "a" * 5000, "-1", "nan"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_in_any_record_field_is_one_line(logs: Path, data: st.DataObject) -> None:
    log = logs / "h1.gtlog"
    pristine = log.read_bytes()
    try:
        records = [dict(r.data) for r in read_log(log)]
        i = data.draw(st.integers(0, len(records) - 1), label="record")
        field = data.draw(st.sampled_from([*records[i], "extra"]), label="field")
        records[i][field] = data.draw(HOSTILE, label="value")
        rechain(log, [msgpack.packb(r, use_bin_type=True) for r in records])
        every_view(log, "h1")
    finally:
        log.write_bytes(pristine)


def _resign(record: dict[str, Any], body: dict[str, Any], key: NodeIdentity) -> None:
    frames = list(record["frames"])
    frames[2] = msgpack.packb(body, use_bin_type=True)
    frames[3] = key.sign(signing_input_digest(frames[1], frames[2], record.get("blob_digest", blob_digest(()))))
    record["frames"] = frames


@pytest.mark.parametrize("node", ["orch", "h1"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_in_any_signed_body_field_is_one_line(logs: Path, run: Travel, node: str, data: st.DataObject) -> None:
    """Bodies re-signed with the sender's real key: signatures verify, so redrive and view meet the value itself."""
    keys = {p.stem: load_identity(p) for p in run.dep.keys.glob("*.key")}
    log = logs / f"{node}.gtlog"
    pristine = log.read_bytes()
    try:
        recs = read_log(log)
        records = [dict(r.data) for r in recs]
        tokens = [r.index for r in recs if (h := header_of(r)) is not None and h.type.startswith(("token.", "hop."))
                  and r.data["verdict"] in ("sent", "accepted") and len(r.frames) == 4]
        i = data.draw(st.sampled_from(tokens), label="record")
        h = header_of(recs[i])
        assert h is not None
        body = msgpack.unpackb(records[i]["frames"][2], raw=False)
        field = data.draw(st.sampled_from([*body, "extra"]), label="field")
        body[field] = data.draw(HOSTILE, label="value")
        _resign(records[i], body, keys[h.sender])
        rechain(log, [msgpack.packb(r, use_bin_type=True) for r in records])
        every_view(log, node)
    finally:
        log.write_bytes(pristine)
