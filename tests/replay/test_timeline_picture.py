"""`gtbus replay --timeline`: the picture of a run from an orchestrator's signed log, and every bad input as one line.

The logs here are written in-process with the deployment's real keys (signed
messages, signed checkpoints), as an orchestrator of three GPU tokens would
write them, with every way a hop can end, a restart, messages that must not
count, and strings chosen to break markup. The same command on real runs:
tests/hostile/test_timeline_markup.py and test_timeline_fleet.py.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from logkit import edit

from gtbus.cli.main import main
from gtbus.console import printable
from gtbus.messages.signer import MessageSigner
from gtbus.messages.types import HopRecord, HopReport, TokenAck, TokenDecline, TokenGrant, TokenReturn, TokenRevoke
from gtbus.recording import Recorder
from gtbus.replay.hop_spans import HopSpan, RunHops, read_hops
from gtbus.replay.timeline import COLUMNS, render_html, render_svg, xml_text
from gtbus.testing import Deployment, make_deployment

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE_REASON = "\"><script>alert('x')</script>&amp; \x1b[2J\u202egnp.exe\ufffe"
HOSTILE_HOLDER = "<script>h</script>"
HOSTILE_TOKEN = 'gpu<3>&"'


class OrchestratorLog:
    """Writes an orchestrator's message log the way its runtime does: every message signed, checkpoints signed."""

    def __init__(self, dep: Deployment, path: Path) -> None:
        self.dep, self.path = dep, path
        self.signers = {i.name: MessageSigner(i) for i in (dep.orchestrator, *dep.holders)}
        self.rec = Recorder(path, "orch", dep.roster, identity=dep.orchestrator, checkpoint_every=5)

    def out(self, msg: object, to: str, epoch: int) -> None:
        _, frames = self.signers["orch"].sign(msg, to, epoch=epoch)
        self.rec.record("out", frames, "sent", peer=None if to == "*" else to)

    def into(self, msg: object, sender: str, epoch: int, verdict: str = "accepted") -> None:
        _, frames = self.signers[sender].sign(msg, "orch", epoch=epoch)
        if verdict == "accepted":
            self.rec.record("in", frames, verdict, peer=sender)
        else:
            self.rec.record_refused(frames, verdict, peer=sender)

    def grant(self, epoch: int, token: str, holder: str, chunk: int, *, to: str | None = None) -> None:
        self.out(TokenGrant(token, "run-7", holder, chunk, "travel", 1e10, b"sealed", {}), to or holder, epoch)

    def settle(self, epoch: int, holder: str, chunk: int, outcome: str, *, losses: tuple[float, float] | None = None, detail: str = "") -> None:
        self.out(HopRecord(epoch, holder, chunk, outcome, {"round": 0, "mode": "travel", "nbytes": 64}), "*", epoch)
        record = {"detail": detail, **({"eval_before": losses[0], "eval_after": losses[1]} if losses else {})}
        self.out(HopReport(epoch, holder, chunk, outcome, record), "h1" if holder == HOSTILE_HOLDER else holder, epoch)

    def restart(self) -> None:
        """The orchestrator process dies and a new one appends to the same log (a new session signs)."""
        self.rec.close()
        self.signers["orch"] = MessageSigner(self.dep.orchestrator)
        self.rec = Recorder(self.path, "orch", self.dep.roster, identity=self.dep.orchestrator, checkpoint_every=5)


def _fleet_log(tmp: Path) -> tuple[Deployment, Path]:
    """Three GPU tokens, three holders, every outcome; a restart cuts one hop off; things that must not count."""
    dep = make_deployment(tmp / "keys", holders=3)
    logs = tmp / "logs"
    log = OrchestratorLog(dep, logs / "orch.gtlog")
    # A holder's own log sits beside it: not the orchestrator's, so not read.
    Recorder(logs / "h1.gtlog", "h1", dep.roster, identity=dep.holders[0]).close()
    log.grant(1, "gpu0", "h1", 0)
    log.grant(2, "gpu1", "h2", 0)
    log.grant(3, "gpu2", "h3", 0)
    log.into(TokenAck("gpu0"), "h1", 1)
    log.into(TokenReturn("gpu1", 0, 1, 64, bytes(32), bytes(32)), "h3", 2)  # not h2's hop: ends nothing
    log.into(TokenDecline("gpu1", "refused"), "h2", 2, verdict="rejected:bad-signature")  # refused on receipt: ends nothing
    log.into(TokenReturn("gpu0", 0, 1, 64, bytes(32), bytes(32)), "h1", 1)
    log.into(TokenDecline("gpu1", HOSTILE_REASON), "h2", 2)
    log.settle(1, "h1", 0, "trained", losses=(5.5, 4.5))
    log.settle(2, "h2", 0, "declined", detail=f"declined: {HOSTILE_REASON}")
    log.out(TokenRevoke("gpu2", "lease expired"), "h3", 3)
    log.settle(3, "h3", 0, "revoked")
    log.grant(4, "gpu1", "h1", 1)
    log.into(TokenReturn("gpu1", 1, 1, 64, bytes(32), bytes(32)), "h1", 4)
    log.settle(4, "h1", 1, "rejected", detail="segment 0 failed authentication")
    log.grant(5, "gpu0", "h2", 1)  # in flight when the orchestrator dies
    log.restart()
    log.grant(6, "gpu0", "h2", 1)
    log.into(TokenReturn("gpu0", 1, 1, 64, bytes(32), bytes(32)), "h2", 6)
    log.settle(6, "h2", 1, "trained", losses=(4.0, float("nan")))  # a loss that is no number is not drawn
    log.grant(7, "gpu1", "h3", 1)
    log.into(TokenReturn("gpu1", 1, 1, 64, bytes(32), bytes(32)), "h3", 7)
    log.settle(7, "h3", 1, "trained", losses=(4.2, 3.9))
    # Names and outcomes a crafted log could carry, signed by the orchestrator's key all the same.
    log.grant(8, HOSTILE_TOKEN, HOSTILE_HOLDER, 0, to="h1")
    log.settle(8, HOSTILE_HOLDER, 0, 'odd"<outcome>', detail=HOSTILE_REASON)
    log.rec.close()
    return dep, logs


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Deployment, Path]:
    return _fleet_log(tmp_path_factory.mktemp("fleet"))


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, ["replay", *args], prog_name="gtbus")


def _one_error_line(r: Result, needle: str, code: int = 1) -> None:
    assert r.exit_code == code, (r.exit_code, r.output, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit)


def _no_files_left(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


def test_hop_spans_follow_the_orchestrators_log(fleet: tuple[Deployment, Path]) -> None:
    dep, logs = fleet
    run = read_hops(logs, [dep.roster])
    assert run.run_id == "run-7"
    assert run.tokens == ["gpu0", "gpu1", "gpu2", HOSTILE_TOKEN]
    assert run.holders == [HOSTILE_HOLDER, "h1", "h2", "h3"]
    by = {h.epoch: h for h in run.hops}
    assert sorted(by) == list(range(1, 9))
    assert run.outcomes() == {"trained": 3, "declined": 1, "revoked": 1, "rejected": 1, "unfinished": 1, 'odd"<outcome>': 1}
    # h3's return for h2's hop and the refused decline ended nothing: h2's own decline did.
    assert by[2].release == "declined" and by[2].reason == HOSTILE_REASON and by[2].detail.startswith("declined: ")
    assert by[3].release == "revoked" and by[3].reason == "lease expired"
    assert by[1].release == "returned" and (by[1].eval_before, by[1].eval_after) == (5.5, 4.5)
    assert by[6].eval_before == 4.0 and by[6].eval_after is None
    # The hop in flight at the restart ends there, unfinished, before the next grant.
    assert by[5].outcome is None and by[5].released is None and by[5].end <= by[6].granted
    for h in run.hops:
        assert 0.0 <= h.granted <= h.held_until <= h.end


def test_svg_has_a_row_per_token_and_holder_and_a_mark_per_hop(fleet: tuple[Deployment, Path], tmp_path: Path) -> None:
    dep, logs = fleet
    out = tmp_path / "run.svg"
    r = _run("--timeline", str(logs), "--out", str(out), "--keys", str(dep.key_dir))
    assert r.exit_code == 0, r.stderr
    assert "3 trained" in r.output and "4 GPUs" in r.output
    assert out.stat().st_mode & 0o777 == 0o600
    root = ET.parse(out).getroot()
    assert root.tag == SVG + "svg"
    tokens = [g.get("data-token") for g in root.iter(SVG + "g") if g.get("class") == "lane token"]
    holders = [g.get("data-holder") for g in root.iter(SVG + "g") if g.get("class") == "lane holder"]
    assert tokens == ["gpu0", "gpu1", "gpu2", HOSTILE_TOKEN]
    assert holders == [HOSTILE_HOLDER, "h1", "h2", "h3"]
    marks = Counter(g.get("data-outcome") for g in root.iter(SVG + "g") if (g.get("class") or "").startswith("mark "))
    assert marks == {"trained": 3, "declined": 1, "revoked": 1, "rejected": 1, "unfinished": 1, "other": 1}
    # Each token's row holds exactly its hops; each holder's row its holdings.
    rows = {g.get("data-token"): g for g in root.iter(SVG + "g") if g.get("class") == "lane token"}
    assert sorted(int(h.get("data-epoch", "0")) for h in rows["gpu0"].iter(SVG + "g") if h.get("class") == "hop") == [1, 5, 6]
    hrows = {g.get("data-holder"): g for g in root.iter(SVG + "g") if g.get("class") == "lane holder"}
    assert sorted(int(b.get("data-epoch", "0")) for b in hrows["h2"].iter(SVG + "rect") if b.get("class") == "held") == [2, 5, 6]
    # The loss: one point per hop with both losses (the NaN one is left out).
    points = [c.get("data-epoch") for c in root.iter(SVG + "circle") if c.get("class") == "loss-point"]
    assert sorted(points) == ["1", "7"]
    title = next(t for t in root.iter(SVG + "text") if t.get("class") == "title")
    assert title.text == "gtbus run run-7: 4 GPUs"


def _assert_inert(path: Path) -> None:
    """Nothing a peer wrote became markup: no script, no handler, no reference out; its text shown escaped."""
    raw = path.read_text(encoding="utf-8")
    root = ET.parse(path).getroot()  # well-formed XML
    for el in root.iter():
        assert el.tag.rsplit("}", 1)[-1] not in ("script", "foreignObject", "iframe", "object", "a", "link", "image", "img"), el.tag
        for name in el.attrib:
            assert not name.lower().startswith("on") and name.rsplit("}", 1)[-1] not in ("href", "src"), (el.tag, name)
    assert "<script" not in raw and "url(" not in raw and "\x1b" not in raw and "\u202e" not in raw and "\ufffe" not in raw
    shown = [t for el in root.iter() for t in (el.text, *el.attrib.values()) if t]
    assert any(printable(HOSTILE_REASON).replace("\ufffe", "\\ufffe") in t for t in shown)
    assert any(HOSTILE_HOLDER in t for t in shown)  # as text, after XML unescaping


def test_peer_strings_are_escaped_in_svg_and_html(fleet: tuple[Deployment, Path], tmp_path: Path) -> None:
    dep, logs = fleet
    for name in ("run.svg", "run.html"):
        out = tmp_path / name
        assert _run("--timeline", str(logs), "--out", str(out)).exit_code == 0
        _assert_inert(out)
    assert xml_text('<a href="x">\'&') == "&lt;a href=&quot;x&quot;&gt;&#x27;&amp;"


def test_html_is_a_self_contained_page_with_the_svg_and_a_row_per_hop(fleet: tuple[Deployment, Path], tmp_path: Path) -> None:
    dep, logs = fleet
    out = tmp_path / "run.html"
    r = _run("--timeline", str(logs), "--out", str(out), "--json")
    assert r.exit_code == 0, r.stderr
    assert '"gpus": 4' in r.output
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    root = ET.fromstring(text)
    assert root.tag == "html"
    assert [el.tag for el in root] == ["head", "body"]
    assert root.find("head/meta").get("charset") == "utf-8"  # type: ignore[union-attr]
    assert root.find("head/link") is None and root.find(".//script") is None
    assert len(root.findall(f"body/{SVG}svg")) == 1
    assert len(root.findall("body/table/tbody/tr")) == 8


def test_bad_inputs_are_one_line_and_write_nothing(fleet: tuple[Deployment, Path], tmp_path: Path) -> None:
    dep, logs = fleet
    out = tmp_path / "pics" / "run.svg"
    out.parent.mkdir()
    _one_error_line(_run("--timeline", str(tmp_path / "nope"), "--out", str(out)), "no such log file or folder")
    junk = tmp_path / "junk.gtlog"
    junk.write_bytes(os.urandom(64))
    _one_error_line(_run("--timeline", str(junk), "--out", str(out)), "not a gtbus message log")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_error_line(_run("--timeline", str(empty), "--out", str(out)), "no .gtlog files")
    _one_error_line(_run("--timeline", str(logs / "h1.gtlog"), "--out", str(out)), "no orchestrator's message log")
    _one_error_line(_run("--timeline", str(logs), "--out", str(tmp_path / "run.png")), "unknown picture format '.png'", code=2)
    _one_error_line(_run("--timeline", str(logs), "--out", str(tmp_path / "run")), "unknown picture format", code=2)
    _one_error_line(_run("--timeline", str(logs)), "--timeline needs --out", code=2)
    _one_error_line(_run(str(logs), "--out", str(out)), "--out goes with --timeline", code=2)
    # Unwritable: under a file; onto a folder.
    _one_error_line(_run("--timeline", str(logs), "--out", str(junk / "run.svg")), "cannot write there")
    folder = tmp_path / "pics" / "taken.svg"
    folder.mkdir()
    _one_error_line(_run("--timeline", str(logs), "--out", str(folder)), "is a directory", code=2)
    assert not out.exists()
    _no_files_left(out.parent)


def test_logs_that_do_not_verify_draw_nothing_and_keep_the_old_picture(fleet: tuple[Deployment, Path], tmp_path: Path) -> None:
    dep, logs = fleet
    out = tmp_path / "run.html"
    out.write_text("the picture of yesterday")
    other = make_deployment(tmp_path / "other-keys", holders=3)
    _one_error_line(_run("--timeline", str(logs), "--out", str(out), "--keys", str(other.key_dir)), "(a picture is drawn only from logs that verify)")
    # A hop's outcome rewritten in the log by whoever holds the file (chain recomputed): its signature fails.
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "orch.gtlog").write_bytes((logs / "orch.gtlog").read_bytes())

    def rewrite(records: list[dict[str, object]]) -> None:
        for r in records:
            frames = r.get("frames")
            if isinstance(frames, list) and len(frames) == 4 and b"segment 0 failed" in frames[2]:
                frames[2] = frames[2].replace(b"rejected", b"trained\x00")
                return
        raise AssertionError("no hop report of epoch 4 in the log")

    edit(forged / "orch.gtlog", rewrite)
    r = _run("--timeline", str(forged), "--out", str(out))
    _one_error_line(r, "bad-signature")
    assert out.read_text() == "the picture of yesterday"
    _no_files_left(tmp_path)


def test_a_log_without_grants_says_so(tmp_path: Path) -> None:
    dep = make_deployment(tmp_path / "keys", holders=1)
    Recorder(tmp_path / "logs" / "orch.gtlog", "orch", dep.roster, identity=dep.orchestrator).close()
    _one_error_line(_run("--timeline", str(tmp_path / "logs"), "--out", str(tmp_path / "x.svg")), "no token grant")
    assert not (tmp_path / "x.svg").exists()


def test_more_hops_than_the_detail_limit_draw_per_pixel_column(fleet: tuple[Deployment, Path]) -> None:
    dep, logs = fleet
    run = read_hops(logs, [dep.roster])
    root = ET.fromstring(render_svg(run, detail_limit=5).split("\n", 1)[1])
    assert any(t.get("class") == "binned" for t in root.iter(SVG + "text"))
    assert not [r for r in root.iter(SVG + "rect") if r.get("class") in ("held", "settling")]
    # Each row's bars count each of its hops once; only hops that did not train are marked.
    for row in (g for g in root.iter(SVG + "g") if (g.get("class") or "").startswith("lane ")):
        kind = row.get("class", "").split()[1]
        name = row.get(f"data-{kind}")
        mine = [h for h in run.hops if (h.token_id if kind == "token" else h.holder) == name]
        assert sum(int(r.get("data-hops", "0")) for r in row.iter(SVG + "rect") if r.get("class") == "bin") == len(mine), name
    marks = Counter(g.get("data-outcome") for g in root.iter(SVG + "g") if (g.get("class") or "").startswith("mark "))
    assert marks == {"declined": 1, "revoked": 1, "rejected": 1, "unfinished": 1, "other": 1}
    # At most the limit of marks (and table rows): the five hops that did not train, cut to four.
    page = ET.fromstring(render_html(run, detail_limit=4).split("\n", 1)[1])
    assert len(page.findall("body/table/tbody/tr")) == 4
    assert sum(1 for g in page.iter(SVG + "g") if (g.get("class") or "").startswith("mark ")) == 4


def test_a_long_run_stays_a_picture_a_browser_can_show() -> None:
    # 20,000 hops on 4 tokens of 16 holders, 1 % not trained: the file is bounded by pixel columns, not hops.
    hops = []
    for e in range(1, 20_001):
        t = (e // 4) * 1.0
        hops.append(HopSpan(e, f"gpu{e % 4}", f"h{e % 16 + 1}", e, t, t + 0.1, "returned", t + 0.9, "trained" if e % 100 else "declined",
                            eval_before=5.0 - e / 10_000, eval_after=4.9 - e / 10_000))
    svg = render_svg(RunHops("long", 0.0, hops))
    root = ET.fromstring(svg.split("\n", 1)[1])
    assert len(svg) < 1_500_000, len(svg)
    assert sum(1 for g in root.iter(SVG + "g") if (g.get("class") or "").startswith("mark ")) == 200
    assert sum(int(r.get("data-hops", "0")) for g in root.iter(SVG + "g") if g.get("class") == "lane token"
               for r in g.iter(SVG + "rect") if r.get("class") == "bin") == 20_000
    line = next(p for p in root.iter(SVG + "polyline") if p.get("class") == "loss-before")
    assert len(line.get("points", "").split()) <= COLUMNS


def test_a_clock_stepped_back_never_ends_a_hop_before_it_began(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dep = make_deployment(tmp_path / "keys", holders=1)
    log = OrchestratorLog(dep, tmp_path / "logs" / "orch.gtlog")
    import gtbus.recording as recording

    for when, write in ((1000.0, lambda: log.grant(1, "gpu0", "h1", 0)),
                        (990.0, lambda: log.into(TokenReturn("gpu0", 0, 1, 64, bytes(32), bytes(32)), "h1", 1)),  # an NTP step back
                        (980.0, lambda: log.settle(1, "h1", 0, "trained", losses=(5.0, 4.0))),
                        (1010.0, lambda: log.grant(2, "gpu0", "h1", 1)),
                        (1005.0, lambda: log.rec.close())):
        monkeypatch.setattr(recording.time, "time", lambda when=when: when)
        write()
    monkeypatch.undo()
    run = read_hops(tmp_path / "logs", [dep.roster])
    first, second = run.hops
    assert first.granted == 0.0 and first.released == 0.0 and first.end == 0.0
    assert second.granted == 10.0 and second.outcome is None and second.end == 10.0  # unfinished, cut where it began
    svg = render_svg(run)
    assert ET.fromstring(svg.split("\n", 1)[1]) is not None
