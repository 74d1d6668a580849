"""The connection guard's rules, with the kernel's counters and the clock played by the test."""

from __future__ import annotations

from gtbus.transport.zmq.conn_guard import ConnectionGuard


class Kernel:
    """Bytes received per fd, as TCP_INFO would say; a fixed receive buffer."""

    def __init__(self, buffer: int = 100) -> None:
        self.received: dict[int, int] = {}
        self.buffer = buffer

    def bytes_received(self, fd: int) -> int | None:
        return self.received.get(fd)

    def receive_buffer(self, fd: int) -> int:
        return self.buffer


def test_bytes_without_a_whole_message_past_the_limit_get_the_connection_shut() -> None:
    k = Kernel()
    g = ConnectionGuard(limit=1000, first_limit=300)
    g.accepted(7, 0.0)
    k.received[7] = 50
    assert g.check(0.1, k) == []  # the first look sets where it starts
    k.received[7] = 50 + 300 + 100  # a first message still unfinished: its limit plus the kernel buffer
    assert g.check(0.2, k) == []
    k.received[7] += 1
    (kick,) = g.check(0.3, k)
    assert kick.fd == 7 and "401 bytes since its last whole message (limit 400)" in kick.reason
    assert g.watched() == []


def test_a_connection_that_hands_out_messages_starts_again_and_earns_the_larger_limit() -> None:
    k = Kernel(buffer=0)
    g = ConnectionGuard(limit=1000, first_limit=300)
    g.accepted(7, 0.0)
    k.received[7] = 0
    g.check(0.0, k)
    for i in range(1, 20):  # streaming whole messages: far more than any limit in total
        k.received[7] += 900
        assert g.delivered(7, "h1") is None
        assert g.check(i * 0.1, k) == []
    k.received[7] += 1000  # a known key may hold its queue of whole messages
    assert g.check(3.0, k) == []
    k.received[7] += 1
    assert [x.fd for x in g.check(3.1, k)] == [7]


def test_a_silent_connection_goes_and_a_key_keeps_two_connections() -> None:
    k = Kernel()
    g = ConnectionGuard(limit=1000, first_limit=300, first_within=5.0, per_key=2)
    for fd in (3, 4, 5, 6):
        g.accepted(fd, float(fd))
        k.received[fd] = 0
    assert g.delivered(3, "obs") is None
    assert g.delivered(4, "obs") is None
    kick = g.delivered(5, "obs")  # a third connection of the same key: the oldest goes
    assert kick is not None and kick.fd == 3 and "'obs'" in kick.reason
    assert g.delivered(99, "obs") is None  # not watched (gone, or not ours): nothing to do
    kicks = g.check(11.5, k)  # fd 6 never said anything for more than 5 s
    assert [x.fd for x in kicks] == [6] and "no message" in kicks[0].reason
    assert sorted(g.watched()) == [4, 5]


def test_a_connection_the_kernel_no_longer_knows_is_forgotten() -> None:
    k = Kernel()
    g = ConnectionGuard(limit=1000, first_limit=300)
    g.accepted(7, 0.0)
    assert g.check(0.1, k) == [] and g.watched() == []
    g.accepted(8, 0.0)
    g.closed(8)
    assert g.watched() == []


def test_too_many_silent_connections_lose_the_oldest_whatever_their_key() -> None:
    g = ConnectionGuard(limit=1000, first_limit=300, max_silent=3)
    g.accepted(1, 0.0)
    assert g.delivered(1, "h1") is None  # spoke: not silent
    assert [g.accepted(fd, float(fd)) for fd in (2, 3, 4)] == [None, None, None]
    kick = g.accepted(5, 5.0)
    assert kick is not None and kick.fd == 2 and "have not spoken" in kick.reason
    assert sorted(g.watched()) == [1, 3, 4, 5]
