"""The staging descriptor broker: one fetch per ticket, only for this user, never waiting on a peer."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from gtbus.errors import DeviceError
from gtbus.gpu import fd_passing
from gtbus.gpu.fd_passing import MAGIC, MAX_PEERS, REQUEST_SIZE, TICKET_SIZE, FdBroker, fetch_fd


@pytest.fixture
def broker() -> FdBroker:
    b = FdBroker()
    yield b
    b.close()


def _offered(broker: FdBroker, content: bytes = b"staging") -> bytes:
    fd = os.memfd_create("t")
    try:
        os.write(fd, content)
        return broker.offer(fd)
    finally:
        os.close(fd)


def _same_file(fd: int, content: bytes) -> bool:
    return os.pread(fd, len(content), 0) == content


def _raw_peer(broker: FdBroker) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("\0" + broker.address)
    s.settimeout(5)
    return s


def _wait_until(what: str, probe) -> None:
    # The broker answers on its own thread; this bounds a hang, it times nothing.
    end = time.monotonic() + 10
    while not probe():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_the_ticket_holder_gets_the_descriptor_once(broker: FdBroker) -> None:
    ticket = _offered(broker, b"hop 7")
    fd = fetch_fd(broker.address, ticket)
    try:
        assert _same_file(fd, b"hop 7")
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)
    with pytest.raises(DeviceError, match="not on offer"):
        fetch_fd(broker.address, ticket)  # replayed ticket
    assert broker.on_offer() == 0 and broker.served == 1


def test_a_wrong_or_withdrawn_ticket_gets_nothing(broker: FdBroker) -> None:
    ticket = _offered(broker)
    with pytest.raises(DeviceError, match="not on offer"):
        fetch_fd(broker.address, bytes(TICKET_SIZE))
    with pytest.raises(DeviceError, match="not on offer"):
        fetch_fd(broker.address, ticket[:-1] + bytes([ticket[-1] ^ 1]))
    broker.withdraw(ticket)
    broker.withdraw(ticket)  # idempotent
    with pytest.raises(DeviceError, match="not on offer"):
        fetch_fd(broker.address, ticket)
    with pytest.raises(DeviceError, match="not a descriptor ticket"):
        fetch_fd(broker.address, b"short")


def test_garbage_and_silence_do_not_stop_the_broker(broker: FdBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fd_passing, "DEADLINE_S", 0.2)  # the test waits on the hang-up itself, not on time
    ticket = _offered(broker)
    # Garbage of the right size: answered NO, the offer untouched.
    with _raw_peer(broker) as s:
        s.sendall(os.urandom(REQUEST_SIZE))
        assert s.recv(16) == b"NO"
    # Far more than a request: only the first REQUEST_SIZE bytes are read.
    with _raw_peer(broker) as s:
        s.sendall(MAGIC + bytes(TICKET_SIZE) + b"x" * 4096)
        assert s.recv(16) == b"NO"
    # Half a request and then silence, and a peer that connects and leaves at once:
    # neither keeps the ticket holder waiting.
    slow = _raw_peer(broker)
    slow.sendall(MAGIC)
    _raw_peer(broker).close()
    fd = fetch_fd(broker.address, ticket)
    os.close(fd)
    # The silent peer is hung up on at its deadline; the broker still serves.
    _wait_until("the silent peer to be hung up on", lambda: slow.recv(16) == b"")
    slow.close()
    assert broker.served == 1 and broker.refused >= 4
    fd = fetch_fd(broker.address, _offered(broker))
    os.close(fd)


def test_idle_peers_cannot_lock_the_ticket_holder_out(broker: FdBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fd_passing, "DEADLINE_S", 0.5)  # the idle peers left at the end are hung up on sooner
    ticket = _offered(broker)
    # Twice as many idle peers as there are slots, all connected first: each new
    # one makes the oldest go, and the ticket holder still gets its descriptor.
    idle = [_raw_peer(broker) for _ in range(2 * MAX_PEERS)]
    fd = fetch_fd(broker.address, ticket)
    os.close(fd)
    hung_up = [s for s in idle if s.recv(16) == b""]  # the oldest ones, made room for
    assert len(hung_up) >= MAX_PEERS
    for s in idle:
        s.close()
    _wait_until("the broker to notice the idle peers left", lambda: broker.refused == 2 * MAX_PEERS)
    assert broker.served == 1


def test_a_peer_of_another_user_is_refused(broker: FdBroker) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run a peer under another uid")
    ticket = _offered(broker)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect("\0" + broker.address)
                try:
                    s.sendall(MAGIC + ticket)
                except BrokenPipeError:
                    pass  # refused at accept, before the request: the answer is still there to read
                os.write(w, s.recv(16) or b"--")
        except BaseException as exc:
            os.write(w, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 16)
    os.waitpid(pid, 0)
    os.close(r)
    assert got == b"NO", got
    fd = fetch_fd(broker.address, ticket)  # the rightful holder still gets it
    os.close(fd)


def test_a_closed_broker_offers_nothing(broker: FdBroker) -> None:
    ticket = _offered(broker)
    broker.close()
    broker.close()
    with pytest.raises(DeviceError, match="no staging broker"):
        fetch_fd(broker.address, ticket)
    fd = os.memfd_create("t")
    with pytest.raises(DeviceError, match="closed"):
        broker.offer(fd)
    os.close(fd)


def test_a_broker_that_never_answers_times_out() -> None:
    # A socket that accepts but never answers (not ours) must not hang the holder.
    address = "gtbus-fd-" + os.urandom(16).hex()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind("\0" + address)
        mute.listen(1)
        with pytest.raises(DeviceError, match="did not answer within 0.2s"):
            fetch_fd(address, bytes(TICKET_SIZE), timeout=0.2)


def test_concurrent_fetchers_of_one_ticket_get_it_once(broker: FdBroker) -> None:
    ticket = _offered(broker)
    got: list[object] = []

    def fetch() -> None:
        try:
            fd = fetch_fd(broker.address, ticket)
            got.append("fd")
            os.close(fd)
        except DeviceError:
            got.append("no")

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == ["fd"] + ["no"] * 7


def test_module_constants_keep_requests_small() -> None:
    assert REQUEST_SIZE == len(MAGIC) + TICKET_SIZE <= 64
    assert fd_passing.DEADLINE_S < fd_passing.FETCH_TIMEOUT_S


def test_any_bytes_from_any_number_of_peers_leave_the_broker_serving() -> None:
    # Random requests (any length, any content, cut off anywhere): each peer gets
    # NO or a hang-up, never a descriptor, and the ticket holder is served after.
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    broker = FdBroker()
    ticket = _offered(broker)
    try:

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(st.binary(max_size=3 * REQUEST_SIZE), min_size=1, max_size=4))
        def peers_send(requests: list[bytes]) -> None:
            socks = []
            for data in requests:
                s = _raw_peer(broker)
                try:
                    s.sendall(data)
                except BrokenPipeError:
                    pass
                s.shutdown(socket.SHUT_WR)  # and then no more: a complete request or a cut one
                socks.append(s)
            for s in socks:
                answer, fds, _, _ = socket.recv_fds(s, 16, 1)
                assert answer in (b"NO", b"") and fds == []
                s.close()

        peers_send()
        fd = fetch_fd(broker.address, ticket)
        assert _same_file(fd, b"staging")
        os.close(fd)
    finally:
        broker.close()


def test_a_flood_of_refused_peers_grows_the_log_by_a_few_lines(broker: FdBroker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="gtbus.gpu.fd_passing")
    for _ in range(300):
        with _raw_peer(broker) as s:
            s.sendall(os.urandom(REQUEST_SIZE))
            assert s.recv(16) == b"NO"
    _wait_until("every refusal counted", lambda: broker.refused == 300)
    lines = [r for r in caplog.records if r.name == "gtbus.gpu.fd_passing"]
    assert 1 <= len(lines) <= 9  # 1, 2, 4, ..., 256
    assert all("refused so far" in r.getMessage() for r in lines)
