"""A holder's strings in the run's picture: `gtbus replay --timeline` of a real run stays inert markup.

A real orchestrator process with one honest holder process (h1) and one
scripted holder (h2, a real node with a valid key) whose hops end every way a
holder can make them end: a decline whose reason is built to break out of SVG
and HTML (quotes, ``<script>``, an entity, terminal escapes, a direction
override, a character XML cannot hold), a lease left to expire, and a return
that does not fit. The run goes on, nothing of h2's is trained, and the
picture drawn from the orchestrator's verified log has one row per token and
per holder, a mark per hop with the outcomes the checkpoint records, and h2's
reason shown as escaped text, never as markup.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from scripted_holder import ScriptedHolder, honest_manifest
from travel_kit import Travel, trained_keys

from gtbus.console import printable
from gtbus.messages.types import TokenAck, TokenDecline, TokenReturn, Welcome
from gtbus.testing import run_async

pytestmark = pytest.mark.slow

CHUNK = 4096
SVG = "{http://www.w3.org/2000/svg}"
REASON = "\"'><script>alert(document.cookie)</script>&lt;b&gt;\x1b]0;owned\x07\u202etxt.exe\ufffe"
#: A lease h2 lets run out once (the wait is the orchestrator's: nothing here times it).
LEASE = 3.0


def _draw(t: Travel, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gtbus", "replay", "--timeline", str(t.logs), "--out", str(out), "--keys", str(t.dep.keys)],
                          capture_output=True, text=True, timeout=120)


def _inert(path: Path) -> ET.Element:
    raw = path.read_text(encoding="utf-8")
    assert "<script" not in raw and "\x1b" not in raw and "\u202e" not in raw and "\ufffe" not in raw and "\x07" not in raw
    root = ET.parse(path).getroot()
    for el in root.iter():
        assert el.tag.rsplit("}", 1)[-1] not in ("script", "foreignObject", "a", "iframe", "link", "image", "img"), el.tag
        assert not any(k.lower().startswith("on") or k.rsplit("}", 1)[-1] in ("href", "src") for k in el.attrib), el.attrib
    shown = [t for el in root.iter() for t in (el.text, *el.attrib.values()) if t]
    assert any(printable(REASON).replace("\ufffe", "\\ufffe") in t for t in shown), "h2's reason is not shown as text"
    return root


def test_a_holders_strings_and_every_outcome_draw_as_escaped_text(travel: Any, tmp_path: Path) -> None:
    t: Travel = travel(holders=2, chunk_tokens=CHUNK, lease=LEASE, steps="5", bytes_per_holder=2 * CHUNK)
    t.start_orchestrator()
    t.dep.start_holder(0)  # h1 is honest; h2 is scripted

    async def scenario() -> None:
        async with ScriptedHolder(t, "h2", tmp_path / "h2") as h2:
            assert isinstance(await h2.register(honest_manifest(2 * CHUNK)), Welcome)
            g, epoch, _ = await h2.next_grant()
            await h2.send(TokenDecline(g.token_id, REASON), epoch)
            g, epoch, _ = await h2.next_grant()
            await h2.send(TokenAck(g.token_id), epoch)  # and nothing more: the lease runs out
            g, epoch, _ = await h2.next_grant()
            await h2.send(TokenReturn(g.token_id, g.chunk_index, 2**40, 2**62, bytes(32), bytes(32)), epoch)
            await h2.decline_until_done()

    run_async(scenario(), timeout=150)
    summary = t.finish()
    hops = t.hops()
    assert {h for _, h, _ in trained_keys(hops)} == {"h1"} and summary["hops_trained"] == 2
    outcomes = Counter(h["outcome"] for h in hops)
    assert {"declined", "revoked", "rejected", "trained"} <= set(outcomes), outcomes

    svg, html = tmp_path / "run.svg", tmp_path / "run.html"
    for out in (svg, html):
        r = _draw(t, out)
        assert r.returncode == 0, r.stderr
    root = _inert(svg)
    _inert(html)
    token_ids = {m.body["token_id"] for m in t.messages() if m.type == "token.grant"}
    lanes = [g.get("data-token") for g in root.iter(SVG + "g") if g.get("class") == "lane token"]
    assert lanes == sorted(token_ids) and len(lanes) == 1
    assert [g.get("data-holder") for g in root.iter(SVG + "g") if g.get("class") == "lane holder"] == ["h1", "h2"]
    marks = Counter(g.get("data-outcome") for g in root.iter(SVG + "g") if (g.get("class") or "").startswith("mark "))
    assert marks == outcomes
    # Epoch by epoch, each hop's mark says what the checkpoint says.
    by_epoch = {int(g.get("data-epoch", "0")): g.get("data-outcome") for g in root.iter(SVG + "g") if g.get("class") == "hop"}
    assert by_epoch == {h["epoch"]: h["outcome"] for h in hops}
    losses = [c for c in root.iter(SVG + "circle") if c.get("class") == "loss-point"]
    assert len(losses) == summary["hops_trained"]
