"""Showing text a peer chose: control characters escaped, so one value is one line.

A peer's string (a holder's decline reason, a node name in a crafted log, a
body field) may hold a newline that forges a second log line, an ESC that
drives the operator's terminal, or a bidi override that reorders what is
read. Everything gtbus shows (log lines, hop lines, replay output, the status
view, ``Error:`` lines) goes through :func:`printable`, which writes every
such character as a visible escape (``\\n``, ``\\x1b``, ``\\u202e``). A
backslash is left as it is: a peer can write text that *looks* like one of
these escapes, but never a character that acts (many messages quote values
with ``repr``, whose escapes would otherwise be doubled).
Logging gets it from :class:`EscapingFormatter`, installed by
:func:`configure_logging` wherever gtbus sets up logging.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

# C0, DEL, C1, and the Unicode format / separator characters that move or hide text.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object) -> str:
    """``str(value)`` with control and text-direction characters escaped: always one safe line."""
    text = value if isinstance(value, str) else str(value)
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape, text)


class EscapingFormatter(logging.Formatter):
    """A formatter whose message part is :func:`printable`.

    A traceback keeps its lines, each escaped and marked with ``  | ``: an
    exception's text may quote a peer's value with newlines in it, and no line
    of it may read as a log record of its own.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        saved = record.message
        record.message = printable(saved)
        try:
            return super().formatMessage(record)
        finally:
            record.message = saved

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        return _marked(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 (logging's name)
        return _marked(stack_info)


def _marked(text: str) -> str:
    return "\n".join("  | " + printable(line) for line in text.splitlines())


LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def configure_logging(level: int, stream: TextIO | None = None) -> None:
    """Send gtbus's log to ``stream`` (stderr) through an :class:`EscapingFormatter`."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(EscapingFormatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
