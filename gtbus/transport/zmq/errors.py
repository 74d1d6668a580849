"""zmq and OS errors become gtbus errors here, once, each with one clear line.

A setup call that fails because of the user's configuration (an endpoint in
use, a bad address) is :class:`~gtbus.errors.ConfigError`; a send to a peer
that is not connected is :class:`~gtbus.errors.PeerUnreachable`; everything
else is :class:`~gtbus.errors.TransportError`. Nothing above the transport
sees a ``zmq.ZMQError``.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

import zmq

from gtbus.errors import ConfigError, PeerUnreachable, TransportError

__all__ = ["map_errors"]

_ERRNO_TEXT = {
    errno.EADDRINUSE: "address already in use",
    errno.EADDRNOTAVAIL: "address not available on this host",
    errno.EINVAL: "invalid endpoint",
    errno.ENODEV: "no such network interface",
    errno.EACCES: "permission denied",
    errno.ENOENT: "no such file or directory",
    zmq.EPROTONOSUPPORT: "transport not supported",
    zmq.ENOCOMPATPROTO: "transport not compatible with this socket type",
}


@contextlib.contextmanager
def map_errors(action: str, *, peer: str | None = None, config: bool = False) -> Iterator[None]:
    """Turn zmq and OS errors into gtbus errors, once, with one clear line.

    ``action`` starts the message (``"cannot bind tcp://..."``, ``"send to 'h1'"``);
    ``config`` marks setup calls whose failure is the user's configuration.
    """
    try:
        yield
    except zmq.ZMQError as e:
        if e.errno == zmq.EHOSTUNREACH and peer is not None:
            raise PeerUnreachable(f"{action}: peer {peer!r} is not connected") from e
        if e.errno in (zmq.ETERM, zmq.ENOTSOCK):
            raise TransportError(f"{action}: transport is closed") from e
        if e.errno == zmq.EAGAIN:
            raise TransportError(f"{action}: timed out, the peer is not reading") from e
        text = _ERRNO_TEXT.get(e.errno or 0, e.strerror or str(e))
        if config:
            raise ConfigError(f"{action}: {text}") from e
        raise TransportError(f"{action}: {text}") from e
    except OSError as e:
        raise TransportError(f"{action}: {e.strerror or e}") from e
