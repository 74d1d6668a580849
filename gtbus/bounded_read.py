"""Reading a file someone else may have written: a regular file, its size checked before it is read.

Rules:

* Only a regular file is read. A FIFO, a device or a folder is refused, and
  opening never waits on one (``O_NONBLOCK``: a FIFO with no writer would
  otherwise block the reader forever).
* The size is checked on the open file before reading, and the read stops one
  byte past the limit, so a file that grows meanwhile is refused too: nothing
  larger than the limit is ever held in memory.
* Symlinks are refused unless the caller follows them (a folder's own files
  must be its own; a path a user typed may be a link).
* Every failure is one line naming the file, raised as the caller's error
  class (each layer keeps its own error type).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gtbus.errors import GtbusError


def read_bounded(path: str | os.PathLike[str], limit: int, what: str, shown: str | None = None, *,
                 follow: bool = False, error: type[GtbusError] = GtbusError) -> bytes:
    """The bytes of regular file ``path`` (at most ``limit``); ``error`` with one line naming ``what`` and the file otherwise."""
    name = shown or str(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(Path(path), flags)
    except FileNotFoundError:
        raise error(f"{what} {name} is missing") from None
    except OSError as exc:
        raise error(f"{what} {name}: cannot read: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # checked on the descriptor: a folder would not even open as a file object
        os.close(fd)
        raise error(f"{what} {name} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > limit:
            raise error(f"{what} {name} is {st.st_size} bytes, over the {limit}-byte limit")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{what} {name} grew past the {limit}-byte limit while read")
    return data
