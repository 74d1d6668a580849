"""ZapHandler.reply: the ZAP rules with no sockets (time passed in), including malformed requests.

The same handler is exercised over real CURVE handshakes in test_zmq_bus.py
(unknown key, connection rate); here every request field takes its wrong forms.
"""

from __future__ import annotations

import pytest
from nacl.public import PrivateKey

from gtbus.errors import ConfigError
from gtbus.transport.base import TransportStats
from gtbus.transport.zmq.endpoint import OnceLog
from gtbus.transport.zmq.zap import ZAP_DOMAIN, ZapHandler

H1 = bytes(PrivateKey.generate().public_key)
STRANGER = bytes(PrivateKey.generate().public_key)


def _handler(burst: int = 2, per_s: float = 1.0) -> tuple[ZapHandler, TransportStats]:
    stats = TransportStats()
    zap = ZapHandler(stats, OnceLog(), per_s=per_s, burst=burst)
    zap.set_allowed({H1: "h1"})
    return zap, stats


def _request(key: bytes = H1, *, version: bytes = b"1.0", domain: bytes = ZAP_DOMAIN,
             mechanism: bytes = b"CURVE", creds: list[bytes] | None = None) -> list[bytes]:
    creds = [key] if creds is None else creds
    return [b"pipe", b"", version, b"req-7", domain, b"127.0.0.1", b"", mechanism, *creds]


def _status(reply: list[bytes] | None) -> tuple[bytes, bytes, bytes]:
    assert reply is not None
    assert reply[:4] == [b"pipe", b"", b"1.0", b"req-7"]  # answers the request it was asked
    return reply[4], reply[5], reply[6]


def test_an_allowed_key_is_admitted_under_its_node_name() -> None:
    zap, stats = _handler()
    assert _status(zap.reply(_request(), now=0.0)) == (b"200", b"OK", b"h1")
    assert (stats.auth_accepted, stats.auth_rejected) == (1, 0)


@pytest.mark.parametrize(("request_", "status", "reason"), [
    (_request(STRANGER), b"400", "unknown-key"),
    (_request(version=b"2.0"), b"500", "bad-version"),
    (_request(domain=b"other"), b"400", "bad-domain"),
    (_request(mechanism=b"PLAIN"), b"400", "bad-mechanism"),
    (_request(creds=[]), b"400", "bad-mechanism"),
    (_request(creds=[H1, H1]), b"400", "bad-mechanism"),
    (_request(creds=[H1[:31]]), b"400", "bad-mechanism"),
    (_request(creds=[H1 + b"\0" * (1 << 20)]), b"400", "bad-mechanism"),
])
def test_anything_else_is_refused_counted_and_named(request_: list[bytes], status: bytes, reason: str) -> None:
    zap, stats = _handler()
    got, _, user = _status(zap.reply(request_, now=0.0))
    assert (got, user) == (status, b"")  # never a name for a refused connection
    assert stats.auth_rejected == 1 and stats.extra == {f"auth-{reason}": 1}
    assert stats.auth_accepted == 0


@pytest.mark.parametrize("request_", [[], [b"x"] * 7, [b"pipe", b"not empty", *_request()[2:]]])
def test_a_malformed_request_is_not_answered(request_: list[bytes]) -> None:
    zap, stats = _handler()
    assert zap.reply(request_, now=0.0) is None
    assert (stats.auth_accepted, stats.auth_rejected) == (0, 0)


def test_handshakes_of_one_key_are_rate_limited_and_refill_with_time() -> None:
    zap, stats = _handler(burst=2, per_s=1.0)
    assert [_status(zap.reply(_request(), now=10.0))[0] for _ in range(3)] == [b"200", b"200", b"400"]
    assert stats.extra == {"auth-connection-rate": 1}
    assert _status(zap.reply(_request(), now=10.5))[0] == b"400"  # half a token: not yet
    assert _status(zap.reply(_request(), now=11.0))[0] == b"200"  # a second later: one more


def test_set_allowed_replaces_the_keys_and_checks_them() -> None:
    zap, _ = _handler()
    zap.set_allowed({STRANGER: "h2"})
    assert _status(zap.reply(_request(H1), now=0.0))[0] == b"400"
    assert _status(zap.reply(_request(STRANGER), now=0.0)) == (b"200", b"OK", b"h2")
    with pytest.raises(ConfigError, match="allowed CURVE key of 'h3' must be 32 raw bytes"):
        zap.set_allowed({b"short": "h3"})
    with pytest.raises(ConfigError, match="node name must be a non-empty string"):
        zap.set_allowed({H1: ""})
    assert _status(zap.reply(_request(STRANGER), now=0.0))[2] == b"h2"  # a refused map changes nothing
