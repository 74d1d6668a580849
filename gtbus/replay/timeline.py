"""The picture of a run: who held each GPU token over time, how each hop ended, and the loss.

One row per GPU token (a bar per hop in its holder's colour: solid while the
holder held the token, pale while the orchestrator verified, trained and
scrubbed; a mark at the end for the outcome), one row per holder (when it held
which GPU, in that GPU's colour), and the held-out loss under them on the same
time axis. SVG, or an HTML page with the SVG inline and a table of the hops;
both self-contained: no script, no external asset, hover titles for details.

Rules:

* Every string that came from a run (names, token ids, reasons, details) may
  be a peer's: it is shown through :func:`gtbus.console.printable` (control
  and direction characters as visible escapes), stripped of what XML cannot
  hold, then XML-escaped, in text and attributes alike. Classes and shapes come
  only from fixed tables here, never from a value of the run.
* The file is written atomically and privately (0600, like the logs: the
  picture shows per-hop losses, which holders may not see of each other's
  chunks), or not at all.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Final

from gtbus.console import printable
from gtbus.errors import ConfigError
from gtbus.private_files import write_private
from gtbus.protocol.hop import HopOutcome
from gtbus.replay.hop_spans import HopSpan, RunHops

#: Outcome -> (legend label, glyph, colour). ``unfinished``: the log was cut before the hop settled.
OUTCOME_LOOK: Final[dict[str, tuple[str, str, str]]] = {
    HopOutcome.TRAINED.value: ("trained", "dot", "#2ca02c"),
    HopOutcome.DECLINED.value: ("declined", "triangle", "#ff7f0e"),
    HopOutcome.REVOKED.value: ("expired (lease ran out, revoked)", "diamond", "#9467bd"),
    HopOutcome.REJECTED.value: ("refused (return or segments rejected)", "cross", "#d62728"),
    HopOutcome.ROLLED_BACK.value: ("rolled back (model changed)", "square", "#8c564b"),
    HopOutcome.UNDELIVERED.value: ("undelivered", "ring", "#7f7f7f"),
    HopOutcome.ABORTED.value: ("aborted", "ring", "#333333"),
    "unfinished": ("unfinished (the log ends first)", "hollow-square", "#333333"),
    "other": ("other outcome", "hollow-diamond", "#333333"),
}
HOLDER_COLOURS: Final = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
GPU_COLOURS: Final = ("#4e79a7", "#59a14f", "#b07aa1", "#f28e2b", "#76b7b2", "#edc948", "#e15759", "#9c755f", "#ff9da7", "#bab0ac")

WIDTH: Final = 1000
LEFT: Final = 170  # the label column
RIGHT: Final = 24
ROW: Final = 22
BAR: Final = 14
LOSS_HEIGHT: Final = 120
COLUMNS: Final = WIDTH - LEFT - RIGHT  # pixel columns of the time axis
#: Up to this many hops each is drawn with its own bars, mark and title; beyond, rows are drawn
#: per pixel column and only hops that did not train get a mark (at ~0.9 KB a hop, a long run's
#: picture would grow past what a browser shows usefully).
DETAIL_LIMIT: Final = 2000
LABEL_CHARS: Final = 22  # a row label longer than this is cut (the hover title has it whole)
TITLE_CHARS: Final = 400

# What XML 1.0 cannot hold at all, after printable() escaped the controls: surrogates and two non-characters.
_NOT_XML = re.compile("[\ud800-\udfff\ufffe\uffff]")
_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"}


def xml_text(value: object, limit: int = TITLE_CHARS) -> str:
    """``value`` as safe XML text or attribute content: one line, escaped, at most ``limit`` characters."""
    text = printable(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    text = _NOT_XML.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return "".join(_ESCAPES.get(c, c) for c in text)


def _outcome_key(span: HopSpan) -> str:
    if span.outcome is None:
        return "unfinished"
    return span.outcome if span.outcome in OUTCOME_LOOK else "other"


def _colour(palette: tuple[str, ...], names: list[str]) -> dict[str, str]:
    return {n: palette[i % len(palette)] for i, n in enumerate(names)}


def _label(name: str) -> str:
    return xml_text(name, LABEL_CHARS)


def _nice_step(span: float, ticks: int = 8) -> float:
    raw = max(span, 1e-9) / ticks
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def _seconds(v: float) -> str:
    return f"{v:.3f}".rstrip("0").rstrip(".") if v else "0"


def glyph(shape: str, x: float, y: float, colour: str, r: float = 5.0) -> str:
    """SVG for an outcome mark centred at (x, y) (``shape`` from :data:`OUTCOME_LOOK` only)."""
    pts: Callable[[list[tuple[float, float]]], str] = lambda ps: " ".join(f"{x + a:.1f},{y + b:.1f}" for a, b in ps)
    return {
        "dot": f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{colour}" stroke="#ffffff"/>',
        "ring": f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r - 1}" fill="#ffffff" stroke="{colour}" stroke-width="2"/>',
        "triangle": f'<polygon points="{pts([(0, -r), (r, r), (-r, r)])}" fill="{colour}" stroke="#ffffff"/>',
        "diamond": f'<polygon points="{pts([(0, -r), (r, 0), (0, r), (-r, 0)])}" fill="{colour}" stroke="#ffffff"/>',
        "hollow-diamond": f'<polygon points="{pts([(0, -r), (r, 0), (0, r), (-r, 0)])}" fill="#ffffff" stroke="{colour}" stroke-width="1.5"/>',
        "square": f'<rect x="{x - r + 1:.1f}" y="{y - r + 1:.1f}" width="{2 * r - 2}" height="{2 * r - 2}" fill="{colour}" stroke="#ffffff"/>',
        "hollow-square": f'<rect x="{x - r + 1:.1f}" y="{y - r + 1:.1f}" width="{2 * r - 2}" height="{2 * r - 2}" fill="#ffffff" stroke="{colour}" stroke-width="1.5"/>',
        "cross": f'<path d="M{x - r:.1f},{y - r:.1f} L{x + r:.1f},{y + r:.1f} M{x - r:.1f},{y + r:.1f} L{x + r:.1f},{y - r:.1f}" stroke="{colour}" stroke-width="2.5"/>',
    }[shape]


def notes(s: HopSpan) -> str:
    """The hop's reason (a decline's or revoke's) and the report's detail, each once (not yet escaped)."""
    reason = f"{s.release}: {s.reason}" if s.reason else ""
    if s.detail and s.reason in s.detail:
        return s.detail
    return "; ".join(part for part in (reason, s.detail) if part)


def hop_title(s: HopSpan) -> str:
    """One line about a hop, for its hover title and the HTML table (not yet escaped)."""
    outcome = s.outcome if s.outcome is not None else "unfinished"
    held = f"held {s.held_until - s.granted:.3f} s" + (f" ({s.release})" if s.release else "")
    loss = f"; loss {s.eval_before:.4f} -> {s.eval_after:.4f}" if s.eval_before is not None and s.eval_after is not None else ""
    detail = f"; {notes(s)}" if notes(s) else ""
    return (f"epoch {s.epoch}, {s.token_id}, {s.holder} chunk {s.chunk}: {outcome}; granted at {_seconds(s.granted)} s, "
            f"{held}, ended at {_seconds(s.end)} s{loss}{detail}")


class _Canvas:
    """The SVG's parts and the time scale."""

    def __init__(self, run: RunHops, detail_limit: int) -> None:
        self.run = run
        self.duration = max(run.end, 1e-3)
        self.parts: list[str] = []
        self.y = 0.0
        self.detailed = len(run.hops) <= detail_limit
        self.mark_limit = detail_limit

    def x(self, t: float) -> float:
        return LEFT + COLUMNS * min(max(t, 0.0), self.duration) / self.duration

    def col(self, t: float) -> int:
        """The pixel column of time ``t``."""
        return min(COLUMNS - 1, int(COLUMNS * min(max(t, 0.0), self.duration) / self.duration))

    def t_of(self, col: int) -> float:
        """When pixel column ``col`` begins."""
        return self.duration * col / COLUMNS

    def add(self, svg: str) -> None:
        self.parts.append(svg)

    def text(self, x: float, y: float, value: object, *, limit: int = TITLE_CHARS, size: int = 11, anchor: str = "start",
             weight: str = "normal", cls: str = "") -> None:
        c = f' class="{cls}"' if cls else ""
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}"{c}>'
                 f"{xml_text(value, limit)}</text>")


def _section(c: _Canvas, title: str) -> None:
    c.text(8, c.y + 14, title, weight="bold")
    c.y += 20


def _open_row(c: _Canvas, kind: str, name: str) -> float:
    """Start a row's group (``kind``: token or holder) with its label and guide line; the row's middle."""
    mid = c.y + ROW / 2
    c.add(f'<g class="lane {kind}" data-{kind}="{xml_text(name)}"><title>{xml_text(name)}</title>')
    c.text(8, mid + 4, name, limit=LABEL_CHARS, cls="row-label")
    c.add(f'<line x1="{LEFT}" y1="{mid:.1f}" x2="{WIDTH - RIGHT}" y2="{mid:.1f}" stroke="#dddddd"/>')
    return mid


def _binned(c: _Canvas, mid: float, spans: list[tuple[float, float, str]], colour: dict[str, str], what: str) -> None:
    """Too many hops to draw one by one: per pixel column, the ``what`` (holder or token) that held most of its time.

    Neighbouring columns with the same one are one bar; its ``data-hops`` counts
    the hops that began under it, so a row's bars count each hop once.
    """
    share: list[dict[str, float]] = [{} for _ in range(COLUMNS)]
    starts = [0] * COLUMNS
    for t0, t1, name in spans:
        j0, j1 = c.col(t0), c.col(t1)
        starts[j0] += 1
        for j in range(j0, j1 + 1):
            overlap = min(t1, c.t_of(j + 1)) - max(t0, c.t_of(j))
            share[j][name] = share[j].get(name, 0.0) + max(overlap, 1e-12)
    top = [max(col, key=col.__getitem__) if col else None for col in share]
    j = 0
    while j < COLUMNS:
        most = top[j]
        k = j + 1
        while k < COLUMNS and top[k] == most:
            k += 1
        if most is not None:
            n = sum(starts[j:k])
            tip = f"{n} hops began from {_seconds(c.t_of(j))} to {_seconds(c.t_of(k))} s; {what} {most} held most of this time"
            c.add(f'<rect class="bin" data-hops="{n}" data-mostly="{xml_text(most)}" x="{LEFT + j}" y="{mid - BAR / 2:.1f}" width="{k - j}" '
                  f'height="{BAR}" fill="{colour[most]}"><title>{xml_text(tip)}</title></rect>')
        j = k


def _hop_mark(c: _Canvas, s: HopSpan, mid: float, inner: str = "") -> None:
    key = _outcome_key(s)
    _, shape, colour = OUTCOME_LOOK[key]
    c.add(f'<g class="hop" data-epoch="{s.epoch}" data-outcome="{key}"><title>{xml_text(hop_title(s))}</title>{inner}'
          f'<g class="mark outcome-{key}" data-outcome="{key}">{glyph(shape, c.x(s.end), mid, colour)}</g></g>')


def _token_rows(c: _Canvas, holder_colour: dict[str, str]) -> None:
    _section(c, "GPU tokens")
    marked = 0
    for token in c.run.tokens:
        mid = _open_row(c, "token", token)
        hops = [h for h in c.run.hops if h.token_id == token]
        if not c.detailed:
            _binned(c, mid, [(s.granted, s.end, s.holder) for s in hops], holder_colour, "holder")
        for s in hops:
            if not c.detailed:
                if s.outcome != HopOutcome.TRAINED.value and marked < c.mark_limit:
                    _hop_mark(c, s, mid)
                    marked += 1
                continue
            fill = holder_colour[s.holder]
            x0, x1, x2 = c.x(s.granted), c.x(s.held_until), c.x(s.end)
            bars = f'<rect class="held" x="{x0:.1f}" y="{mid - BAR / 2:.1f}" width="{max(x1 - x0, 1.0):.1f}" height="{BAR}" fill="{fill}"/>'
            if x2 > x1:
                bars += f'<rect class="settling" x="{x1:.1f}" y="{mid - BAR / 2:.1f}" width="{x2 - x1:.1f}" height="{BAR}" fill="{fill}" fill-opacity="0.3"/>'
            _hop_mark(c, s, mid, bars)
        c.add("</g>")
        c.y += ROW


def _holder_rows(c: _Canvas, gpu_colour: dict[str, str], holder_colour: dict[str, str]) -> None:
    c.y += 8
    _section(c, "holders")
    for holder in c.run.holders:
        mid = _open_row(c, "holder", holder)
        hops = [h for h in c.run.hops if h.holder == holder]
        if not c.detailed:
            # Per column "which GPU" would split a busy holder's row into a bar a pixel: when it held one is what shows.
            _binned(c, mid, [(s.granted, s.held_until, holder) for s in hops], holder_colour, "holder")
            hops = []
        for s in hops:
            x0, x1 = c.x(s.granted), c.x(s.held_until)
            what = f"{s.holder} held {s.token_id} from {_seconds(s.granted)} to {_seconds(s.held_until)} s (epoch {s.epoch}, chunk {s.chunk})"
            c.add(f'<rect class="held" data-token="{xml_text(s.token_id)}" data-epoch="{s.epoch}" x="{x0:.1f}" y="{mid - BAR / 2:.1f}" '
                  f'width="{max(x1 - x0, 1.0):.1f}" height="{BAR}" fill="{gpu_colour[s.token_id]}"><title>{xml_text(what)}</title></rect>')
        c.add("</g>")
        c.y += ROW


def _loss_chart(c: _Canvas, gpu_colour: dict[str, str]) -> None:
    points = sorted((s for s in c.run.hops if s.eval_before is not None and s.eval_after is not None), key=lambda s: s.end)
    c.y += 10
    c.text(8, c.y + 14, "loss", weight="bold")
    c.text(8, c.y + 28, "nats/token, held out:", size=9)
    c.text(8, c.y + 40, "before / after training", size=9)
    top, bottom = c.y + 6, c.y + LOSS_HEIGHT
    c.add(f'<g class="loss"><rect x="{LEFT}" y="{top:.1f}" width="{COLUMNS}" height="{bottom - top:.1f}" fill="none" stroke="#cccccc"/>')
    if not points:
        c.text((LEFT + WIDTH) / 2, (top + bottom) / 2, "no losses recorded (no hop was trained)", anchor="middle")
    else:
        values = [v for s in points for v in (s.eval_before, s.eval_after) if v is not None]
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.08 or max(abs(hi) * 0.05, 0.05)
        lo, hi = lo - pad, hi + pad

        def y(v: float) -> float:
            return bottom - (bottom - top) * (v - lo) / (hi - lo)

        for v in (lo + pad, (lo + hi) / 2, hi - pad):
            c.text(LEFT - 4, y(v) + 4, f"{v:.3f}", anchor="end", size=9)
            c.add(f'<line x1="{LEFT}" y1="{y(v):.1f}" x2="{WIDTH - RIGHT}" y2="{y(v):.1f}" stroke="#eeeeee"/>')
        series = _loss_series(c, points)
        for i, (cls, dash) in enumerate((("loss-before", ""), ("loss-after", ' stroke-dasharray="5,3"'))):
            line = " ".join(f"{c.x(t):.1f},{y(v[i]):.1f}" for t, v in series)
            c.add(f'<polyline class="{cls}" points="{line}" fill="none" stroke="#555555" stroke-width="1.5"{dash}/>')
        for s in points if c.detailed else ():
            tip = xml_text(f"epoch {s.epoch}, {s.token_id}, {s.holder} chunk {s.chunk}: loss {s.eval_before:.4f} before, {s.eval_after:.4f} after")
            c.add(f'<circle class="loss-point" data-epoch="{s.epoch}" cx="{c.x(s.end):.1f}" cy="{y(s.eval_before or 0.0):.1f}" r="3" '
                  f'fill="{gpu_colour[s.token_id]}"><title>{tip}</title></circle>')
    c.add("</g>")
    c.y = bottom


def _loss_series(c: _Canvas, points: list[HopSpan]) -> list[tuple[float, tuple[float, float]]]:
    """(time, (before, after)) per trained hop; with many hops, their means per pixel column."""
    raw = [(s.end, (s.eval_before or 0.0, s.eval_after or 0.0)) for s in points]
    if c.detailed:
        return raw
    cols: dict[int, list[tuple[float, tuple[float, float]]]] = {}
    for t, v in raw:
        cols.setdefault(c.col(t), []).append((t, v))
    return [(sum(t for t, _ in group) / len(group), (sum(v[0] for _, v in group) / len(group), sum(v[1] for _, v in group) / len(group)))
            for _, group in sorted(cols.items())]


def _axis(c: _Canvas, rows_top: float, grid_at: int) -> None:
    """The time axis under everything; its grid lines go in at ``grid_at``, behind the rows."""
    step = _nice_step(c.duration)
    c.add('<g class="axis">')
    n = int(c.duration / step + 1e-9)
    grid = []
    for i in range(n + 1):
        t = i * step
        x = c.x(t)
        grid.append(f'<line x1="{x:.1f}" y1="{rows_top:.1f}" x2="{x:.1f}" y2="{c.y + 4:.1f}" stroke="#e8e8e8"/>')
        c.text(x, c.y + 16, f"{_seconds(t)} s", anchor="middle", size=10)
    c.parts.insert(grid_at, '<g class="grid">' + "".join(grid) + "</g>")
    c.text(WIDTH - RIGHT, c.y + 30, "seconds since the first grant (the orchestrator's clock)", anchor="end", size=10)
    c.add("</g>")
    c.y += 36


def _legend(c: _Canvas, holder_colour: dict[str, str], gpu_colour: dict[str, str]) -> None:
    items: list[tuple[str, str]] = []  # (swatch svg at 0,0, label)
    seen = set(c.run.outcomes()) | {"other" for s in c.run.hops if _outcome_key(s) == "other"}
    for key, (label, shape, colour) in OUTCOME_LOOK.items():
        if key in seen or key == HopOutcome.TRAINED.value:
            items.append((glyph(shape, 6, -4, colour), label))
    items += [(f'<rect x="0" y="-10" width="12" height="12" fill="{col}"/>', f"holder {name}") for name, col in holder_colour.items()]
    items += [(f'<rect x="0" y="-10" width="12" height="12" fill="{col}"/>', f"GPU {name}") for name, col in gpu_colour.items()]
    items.append(('<rect x="0" y="-10" width="12" height="12" fill="#999999" fill-opacity="0.3"/>', "orchestrator verifies, trains, scrubs"))
    items.append(('<line x1="0" y1="-4" x2="14" y2="-4" stroke="#555555" stroke-width="1.5"/>', "loss before training on the chunk"))
    items.append(('<line x1="0" y1="-4" x2="14" y2="-4" stroke="#555555" stroke-width="1.5" stroke-dasharray="5,3"/>', "loss after"))
    c.add('<g class="legend">')
    x, c.y = 8.0, c.y + 14
    for swatch, label in items:
        width = 22 + 6.2 * min(len(printable(label)), 40) + 16
        if x + width > WIDTH - RIGHT and x > 8:
            x, c.y = 8.0, c.y + 18
        c.add(f'<g transform="translate({x:.1f},{c.y:.1f})">{swatch}</g>')
        c.text(x + 20, c.y, label, limit=40, size=10)
        x += width
    c.add("</g>")
    c.y += 12


def summary_line(run: RunHops) -> str:
    """The run in one line: GPUs, holders, hops by outcome (not yet escaped)."""
    k = len(run.tokens)
    outcomes = ", ".join(f"{n} {o}" for o, n in sorted(run.outcomes().items()))
    return f"{k} GPU{'s' if k != 1 else ''}, {len(run.holders)} holders, {len(run.hops)} hops ({outcomes}) over {run.end:.2f} s"


def render_svg(run: RunHops, *, standalone: bool = True, detail_limit: int = DETAIL_LIMIT) -> str:
    """The picture as an SVG document (``standalone=False``: the ``<svg>`` element only, for an HTML page).

    A run of more than ``detail_limit`` hops is drawn per pixel column (see :data:`DETAIL_LIMIT`).
    """
    holder_colour = _colour(HOLDER_COLOURS, run.holders)
    gpu_colour = _colour(GPU_COLOURS, run.tokens)
    c = _Canvas(run, detail_limit)
    title = f"gtbus run {run.run_id}: {len(run.tokens)} GPU{'s' if len(run.tokens) != 1 else ''}"
    c.text(8, 22, title, size=16, weight="bold", cls="title")
    c.text(8, 40, summary_line(run), size=11)
    c.y = 50
    if not c.detailed:
        c.text(8, 56, f"{len(run.hops)} hops are more than {detail_limit}: rows drawn per pixel column (who held most of it); "
                      f"marks only for hops that did not train (at most {detail_limit}); losses averaged per column", size=10, cls="binned")
        c.y = 62
    rows_top, grid_at = c.y + 20, len(c.parts)
    _token_rows(c, holder_colour)
    _holder_rows(c, gpu_colour, holder_colour)
    _loss_chart(c, gpu_colour)
    _axis(c, rows_top, grid_at)
    _legend(c, holder_colour, gpu_colour)
    height = math.ceil(c.y + 8)
    head = '<?xml version="1.0" encoding="UTF-8"?>\n' if standalone else ""
    return (f'{head}<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
            f'font-family="sans-serif" font-size="11"><title>{xml_text(title)}</title>'
            f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>' + "".join(c.parts) + "</svg>\n")


_STYLE = ("body{font-family:sans-serif;margin:16px;color:#222}h1{font-size:18px}p{font-size:13px}"
          "table{border-collapse:collapse;font-size:12px;margin-top:12px}th,td{border:1px solid #cccccc;padding:2px 6px;text-align:left}"
          "td.num{text-align:right}")


def _cell(value: object, num: bool = False) -> str:
    return f'<td class="num">{xml_text(value)}</td>' if num else f"<td>{xml_text(value)}</td>"


def render_html(run: RunHops, *, detail_limit: int = DETAIL_LIMIT) -> str:
    """A small self-contained page (well-formed XML as well as HTML): the SVG inline and a table of the hops.

    Beyond ``detail_limit`` hops the table lists only those that did not train.
    """
    title = f"gtbus run {run.run_id}: {len(run.tokens)} GPU{'s' if len(run.tokens) != 1 else ''}"
    rows = []
    listed = run.hops if len(run.hops) <= detail_limit else [s for s in run.hops if s.outcome != HopOutcome.TRAINED.value][:detail_limit]
    for s in listed:
        loss = f"{s.eval_before:.4f} -> {s.eval_after:.4f}" if s.eval_before is not None and s.eval_after is not None else "-"
        rows.append(f'<tr class="hop" data-epoch="{s.epoch}">' + _cell(s.epoch, True) + _cell(s.token_id) + _cell(s.holder)
                    + _cell(s.chunk, True) + _cell(_outcome_key(s) if s.outcome is None else s.outcome) + _cell(f"{s.held_until - s.granted:.3f}", True)
                    + _cell(s.release or "-") + _cell(f"{s.end:.3f}", True) + _cell(loss) + _cell(notes(s)) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("epoch", "GPU token", "holder", "chunk", "outcome", "held s", "ended by", "end s", "loss", "detail"))
    return ("<!DOCTYPE html>\n"
            f'<html lang="en"><head><meta charset="utf-8"/><title>{xml_text(title)}</title><style>{_STYLE}</style></head>'
            f"<body><h1>{xml_text(title)}</h1><p>{xml_text(summary_line(run))}. Hover a bar or a mark for its hop.</p>\n"
            + ("" if listed is run.hops else f"<p>The table lists the {len(listed)} hops that did not train (of {len(run.hops)}).</p>\n")
            + render_svg(run, standalone=False, detail_limit=detail_limit)
            + f"<table><thead><tr>{head}</tr></thead><tbody>" + "\n".join(rows) + "</tbody></table>"
            "<p>Drawn by <code>gtbus replay --timeline</code> from the orchestrator's verified message log.</p></body></html>\n")


#: Output suffix -> renderer.
FORMATS: Final[dict[str, Callable[[RunHops], str]]] = {".svg": render_svg, ".html": render_html, ".htm": render_html}


def renderer_for(out: Path) -> Callable[[RunHops], str]:
    """The renderer for an output file's suffix; ConfigError naming the suffixes known."""
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{out}: unknown picture format {out.suffix or '(no suffix)'!r}; use {', '.join(FORMATS)}")
    return fmt


def write_picture(run: RunHops, out: str | Path) -> Path:
    """Draw ``run`` into ``out`` (.svg or .html), atomically; ConfigError naming what is wrong, and nothing written."""
    p = Path(out)
    text = renderer_for(p)(run)
    return write_private(p, text.encode("utf-8"))
