"""Files and folders only this user can read: secrets, run state, logs, summaries.

Rules every writer in gtbus follows by calling this module (one copy of them):

* A file is **created with mode 0600 before any content** is written, with
  ``O_CREAT|O_EXCL|O_NOFOLLOW``: a chmod after writing would leave a window in
  which others can read it, and opening a name that is already there would
  follow a planted symlink or keep a pre-existing file's looser mode.
* A file that is rewritten (keys with ``--force``, checkpoints, summaries) is
  written to a fresh temporary name in the same folder (``mkstemp``: random,
  ``O_EXCL``, 0600), synced, and renamed over the target. ``rename`` replaces a
  symlink at the target rather than following it, and readers see the old
  file or the new one, never half of one. A planted ``NAME.tmp`` does nothing:
  the temporary name is not predictable.
* An append-only file (message logs) is opened with ``O_NOFOLLOW``; if it
  already exists with a looser mode it is tightened to 0600 before use.
* Run folders are 0700; a pre-existing folder of this user is tightened to
  0700, and a folder that is a symlink or another user's is refused.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from gtbus.errors import ConfigError

FILE_MODE = 0o600
DIR_MODE = 0o700
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and missing parents) as 0700 folders; tighten an existing one of ours to 0700.

    Raises ConfigError naming the folder when it is a symlink, not a folder,
    or belongs to another user.
    """
    p = make_folders(path)
    try:
        st = os.lstat(p)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot use folder: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{p}: is a symlink; give the real folder (gtbus keeps run state only in folders it can make private)")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{p}: exists and is not a folder")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{p}: belongs to another user (uid {st.st_uid}); use a folder of your own")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(p, stat.S_IMODE(st.st_mode) & ~0o077 | DIR_MODE)
    return p


def make_folders(path: str | os.PathLike[str]) -> Path:
    """Create the missing folders of ``path`` with mode 0700 (existing ones are left as they are)."""
    p = Path(path)
    missing: list[Path] = []
    for q in (p, *p.parents):
        if os.path.lexists(q):
            break
        missing.append(q)
    for q in reversed(missing):
        try:
            os.mkdir(q, DIR_MODE)
        except FileExistsError:  # made by a racing process of ours
            pass
        except OSError as exc:
            raise ConfigError(f"{q}: cannot create folder: {exc.strerror}") from None
    return p


@contextlib.contextmanager
def replace_privately(path: str | os.PathLike[str], *, overwrite: bool = True, mode: int = FILE_MODE) -> Iterator[BinaryIO]:
    """Write a file atomically: yield a 0600 temporary file beside ``path``, then sync and rename it into place.

    With ``overwrite=False`` an existing ``path`` (file or symlink) is refused
    with ConfigError, checked atomically by ``link``. On any error the
    temporary file is removed and ``path`` is left as it was. ``mode`` is
    for files meant to be shared (``NAME.pub``); it is set before any content.
    """
    p = Path(path)
    make_folders(p.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)  # O_EXCL, 0600
    except OSError as exc:
        raise ConfigError(f"{p.parent}: cannot write there: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode != FILE_MODE:
                os.fchmod(fh.fileno(), mode)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        try:
            if overwrite:
                os.replace(tmp, p)
            else:
                os.link(tmp, p, follow_symlinks=False)
                os.unlink(tmp)
        except FileExistsError:
            raise ConfigError(f"{p}: already exists (refusing to overwrite)") from None
        except OSError as exc:
            raise ConfigError(f"{p}: cannot write: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_private(path: str | os.PathLike[str], data: bytes | str, *, overwrite: bool = True, mode: int = FILE_MODE) -> Path:
    """Write ``data`` to ``path`` as a 0600 file, atomically (see :func:`replace_privately`)."""
    with replace_privately(path, overwrite=overwrite, mode=mode) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def open_private_append(path: str | os.PathLike[str]) -> int:
    """An ``O_APPEND`` descriptor on ``path``, created 0600; never through a symlink; an existing file tightened to 0600."""
    p = Path(path)
    make_folders(p.parent)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot open for appending: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(f"{p}: is not a regular file")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.fchmod(fd, FILE_MODE)
    return fd


def append_private(path: str | os.PathLike[str]) -> BinaryIO:
    """:func:`open_private_append` as a binary file object (for a child process's stderr)."""
    return os.fdopen(open_private_append(path), "ab")
