"""The host backend: fresh staging shared with another process, revocation, private buffers, scrub, measurement."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import blake3
import msgpack
import numpy as np
import pytest
from nacl.public import PrivateKey

from gtbus.errors import ChannelError, DeviceError
from gtbus.gpu.channel import ChannelParams, SegmentContext, SegmentSealer, segment_count, staging_size
from gtbus.gpu.device import Device, DeviceBuffer
from gtbus.gpu.fd_passing import fetch_fd
from gtbus.gpu.host import HANDLE_PREFIX, SHM_DIR, STAGING_SEALS, HostBuffer, HostDevice
from gtbus.gpu.measure import measure_code, measure_model
from gtbus.gpu.sealing import seal_params

REPO = Path(__file__).resolve().parents[2]

# The holder: a separate process that knows only its X25519 secret and the
# sealed params. It maps the staging by handle, seals its data, unmaps, and
# reports what a TokenReturn would carry.
HOLDER = r"""
import sys, msgpack, numpy as np
from gtbus.gpu.channel import SegmentContext, SegmentSealer, segment_count
from gtbus.gpu.host import HostDevice
from gtbus.gpu.sealing import open_params
msg = msgpack.unpackb(sys.stdin.buffer.read())
params = open_params(msg["sealed"], msg["secret"])
data = np.random.default_rng(msg["seed"]).integers(0, 256, msg["nbytes"], dtype=np.uint8)
ctx = SegmentContext(msg["run"], msg["epoch"], msg["holder"], segment_count(data.nbytes, params.segment_size))
with HostDevice.map_staging(params.buffer_handle) as staging:
    summary = SegmentSealer(params).seal_into(data, staging.view, ctx)
sys.stdout.buffer.write(msgpack.packb([summary.count, summary.nbytes, summary.ciphertext_digest]))
"""


def run_holder(payload: dict[str, object]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-c", HOLDER],
        input=msgpack.packb(payload),
        capture_output=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))},
        timeout=60,
    )


@pytest.fixture
def dev() -> HostDevice:
    return HostDevice()


def shm_names() -> set[str]:
    return set(os.listdir(SHM_DIR))


def test_host_device_satisfies_the_protocol(dev: HostDevice) -> None:
    device: Device = dev  # checked by type checkers; the asserts check at run time
    assert device.name == "host" and device.array_module is np
    assert isinstance(dev.alloc(8), HostBuffer) and isinstance(dev.alloc(8), DeviceBuffer)


def test_device_id_names_host_process_and_instance(dev: HostDevice) -> None:
    kind, _host, pid, instance = dev.device_id.split(":")
    assert kind == "host" and pid == str(os.getpid()) and len(instance) == 16
    assert HostDevice().device_id != dev.device_id


def test_holder_in_another_process_writes_and_device_decrypts(dev: HostDevice) -> None:
    nbytes = (3 << 20) + 123
    params_seg = 1 << 20
    staging, handle = dev.alloc_hop_staging(staging_size(nbytes, params_seg))
    params = ChannelParams.generate(handle, nbytes, segment_size=params_seg)
    holder_key = PrivateKey.generate()
    result = run_holder({
        "sealed": seal_params(params, bytes(holder_key.public_key)),
        "secret": bytes(holder_key),
        "seed": 42, "nbytes": nbytes, "run": "run-x", "epoch": 3, "holder": "alice",
    })
    assert result.returncode == 0, result.stderr.decode()
    count, got_nbytes, digest = msgpack.unpackb(result.stdout)
    assert (count, got_nbytes) == (4, nbytes)

    out = dev.alloc(nbytes)
    dev.open_segments(staging, out, params, SegmentContext("run-x", 3, "alice", count), count, got_nbytes)
    expected = np.random.default_rng(42).integers(0, 256, nbytes, dtype=np.uint8)
    assert np.array_equal(dev.as_array(out, np.uint8), expected)
    dev.revoke_staging(staging)


def test_staging_is_a_fresh_sealed_memfd_with_no_name(dev: HostDevice) -> None:
    before = shm_names()
    a, handle_a = dev.alloc_hop_staging(100)
    b, handle_b = dev.alloc_hop_staging(100)
    assert handle_a != handle_b and a.handle == handle_a
    assert shm_names() == before, "staging must have no name anyone could open, truncate or replace"
    for handle in (handle_a, handle_b):
        assert handle.startswith(HANDLE_PREFIX)
        with HostDevice.map_staging(handle) as mapping:
            assert mapping.nbytes == 100
    assert handle_a not in repr(a)
    dev.release(a)
    dev.release(b)


def test_a_holder_cannot_change_the_size_of_its_staging(dev: HostDevice) -> None:
    # Whatever the holder does with the descriptor it was given, the device's
    # mapping keeps its size: reading every byte of it cannot fault.
    staging, handle = dev.alloc_hop_staging(1 << 16)
    address, ticket = handle[len(HANDLE_PREFIX) :].split(":")
    fd = fetch_fd(address, bytes.fromhex(ticket))
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & STAGING_SEALS == STAGING_SEALS
        for size in (0, 100, 1 << 20):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 1 << 16)  # writing past the end would grow it
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)  # nor can seals be added
        os.pwrite(fd, b"holder bytes", 0)  # writing inside it is allowed: that is the hop
        assert os.fstat(fd).st_size == 1 << 16
    finally:
        os.close(fd)
    assert not dev.verify_zero(staging)
    dev.scrub(staging)
    assert dev.verify_zero(staging)
    dev.release(staging)


def test_staging_is_handed_out_once(dev: HostDevice) -> None:
    staging, handle = dev.alloc_hop_staging(64)
    HostDevice.map_staging(handle).close()
    with pytest.raises(DeviceError, match="not exported"):
        HostDevice.map_staging(handle)  # a replayed ticket, a second fetcher
    dev.release(staging)


def test_revoked_handle_cannot_be_mapped_again(dev: HostDevice) -> None:
    staging, handle = dev.alloc_hop_staging(64)
    dev.revoke_staging(staging)
    with pytest.raises(DeviceError, match="not exported") as info:
        HostDevice.map_staging(handle)  # revoked before anyone fetched it
    assert handle not in str(info.value), "error messages must not carry a whole capability"
    assert handle.split(":")[-1] not in str(info.value)
    dev.revoke_staging(staging)  # idempotent
    with pytest.raises(DeviceError, match="revoked"):
        dev.scrub(staging)


def test_revoked_handle_cannot_be_mapped_from_another_process(dev: HostDevice) -> None:
    staging, handle = dev.alloc_hop_staging(64)
    dev.revoke_staging(staging)
    probe = subprocess.run(
        [sys.executable, "-c", f"from gtbus.gpu.host import HostDevice; HostDevice.map_staging({handle!r})"],
        capture_output=True, cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}, timeout=60,
    )
    assert probe.returncode != 0 and b"DeviceError" in probe.stderr and b"not exported" in probe.stderr


@pytest.mark.parametrize("handle", [
    "../etc/passwd", "gtbus-hop-" + "a" * 32, "", 7, None,
    HANDLE_PREFIX + "gtbus-fd-" + "a" * 32 + ":" + "b" * 63,
    HANDLE_PREFIX + "gtbus-fd-" + "a" * 32 + ":" + "g" * 64,
    HANDLE_PREFIX + "../" + "a" * 32 + ":" + "b" * 64,
    HANDLE_PREFIX + "gtbus-fd-" + "a" * 32 + ":" + "b" * 64 + "\n",
])
def test_malformed_handles_are_refused(handle: object) -> None:
    with pytest.raises(DeviceError, match="not a host staging handle"):
        HostDevice.map_staging(handle)  # type: ignore[arg-type]


def test_private_buffers_expose_no_handle(dev: HostDevice) -> None:
    before = shm_names()
    buf = dev.alloc(1 << 16)
    assert buf.handle is None
    assert shm_names() == before, "a private buffer must not create anything mappable"
    with pytest.raises(DeviceError, match="private"):
        dev.revoke_staging(buf)
    staging, _ = dev.alloc_hop_staging(64)
    with pytest.raises(DeviceError, match="private one"):
        dev.open_segments(buf, buf, ChannelParams.generate("x", 1), SegmentContext("r", 1, "h", 1), 1, 0)
    with pytest.raises(DeviceError, match="hop staging"):
        dev.as_array(staging, np.uint8)
    dev.release(staging)


def test_dropped_staging_is_withdrawn(dev: HostDevice) -> None:
    staging, handle = dev.alloc_hop_staging(64)
    del staging
    with pytest.raises(DeviceError, match="not exported"):
        HostDevice.map_staging(handle)


def test_a_closed_device_hands_out_nothing(dev: HostDevice) -> None:
    staging, handle = dev.alloc_hop_staging(64)
    dev.close()
    with pytest.raises(DeviceError, match="not exported"):
        HostDevice.map_staging(handle)
    dev.scrub(staging)  # its own mapping still works until the hop releases it
    dev.release(staging)


def test_agent_writes_outside_the_staging_are_refused(dev: HostDevice) -> None:
    staging, handle = dev.alloc_hop_staging(64)
    with HostDevice.map_staging(handle) as mapping:
        mapping.write_ciphertext(0, b"x" * 64)
        for offset, data in ((1, b"x" * 64), (64, b"x"), (-1, b"x"), (1 << 62, b"x"), (True, b"x"), (0, b"x" * 65)):
            with pytest.raises(DeviceError, match="do not fit 64 bytes"):
                mapping.write_ciphertext(offset, data)  # type: ignore[arg-type]
    dev.release(staging)


def test_legacy_shm_staging_is_discarded_and_nothing_else(dev: HostDevice, tmp_path: Path) -> None:
    legacy = "gtbus-hop-" + os.urandom(16).hex()
    path = os.path.join(SHM_DIR, legacy)
    open(path, "wb").close()
    dev.discard_export(legacy)
    assert not os.path.exists(path)
    keep = tmp_path / "keep"
    keep.write_bytes(b"x")
    for handle in ("../" + str(keep), str(keep), HANDLE_PREFIX + "x"):
        dev.discard_export(handle)
    assert keep.exists()


def test_unmap_with_live_views_is_refused_then_succeeds(dev: HostDevice) -> None:
    staging, handle = dev.alloc_hop_staging(64)
    mapping = HostDevice.map_staging(handle)
    held = mapping.view[0:8]
    with pytest.raises(DeviceError, match="live views"):
        HostDevice.unmap(mapping)
    held.release()
    HostDevice.unmap(mapping)
    with pytest.raises(DeviceError, match="unmapped"):
        mapping.view
    dev.release(staging)


def test_params_for_another_buffer_are_refused(dev: HostDevice) -> None:
    staging, _ = dev.alloc_hop_staging(staging_size(10, 16))
    _, other_handle = dev.alloc_hop_staging(64)
    params = ChannelParams.generate(other_handle, 10, segment_size=16)
    with pytest.raises(ChannelError, match="another staging buffer"):
        dev.open_segments(staging, dev.alloc(10), params, SegmentContext("r", 1, "h", 1), 1, 10)
    dev.release(staging)


def test_failed_open_leaves_the_data_buffer_zero(dev: HostDevice) -> None:
    n = 5000
    staging, handle = dev.alloc_hop_staging(staging_size(n, 1024))
    params = ChannelParams.generate(handle, n, segment_size=1024)
    ctx = SegmentContext("r", 2, "bob", segment_count(n, 1024))
    with HostDevice.map_staging(handle) as mapping:
        SegmentSealer(params).seal_into(os.urandom(n), mapping.view, ctx)
        mapping.view[3 * 1040 + 7] ^= 0xFF
    out = dev.alloc(n)
    try:
        dev.open_segments(staging, out, params, ctx, ctx.count, n)
    except ChannelError as exc:
        assert "segment 3 of 5" in str(exc)
        # The usual handler revokes while the error (and its traceback) is alive.
        dev.revoke_staging(staging)
    else:
        pytest.fail("a flipped byte must not authenticate")
    assert dev.verify_zero(out)


def test_a_writer_racing_the_device_gets_a_refusal_or_changes_nothing(dev: HostDevice) -> None:
    # Someone maps the staging and keeps flipping one ciphertext byte while the
    # device opens it. Each open either refuses or yields exactly the sealed
    # plaintext: the tag is checked over the very bytes that are decrypted.
    n, seg = 8 << 20, 1 << 20
    plain = os.urandom(n)
    outcomes = set()
    for epoch in range(6):
        staging, handle = dev.alloc_hop_staging(staging_size(n, seg))
        params = ChannelParams.generate(handle, n, segment_size=seg)
        ctx = SegmentContext("r", epoch, "h", segment_count(n, seg))
        mapping = HostDevice.map_staging(handle)
        SegmentSealer(params).seal_into(plain, mapping.view, ctx)
        stop = threading.Event()

        def flip(view: memoryview = mapping.view) -> None:
            at = 5 * (seg + 16) + 1000
            while not stop.is_set():
                view[at] ^= 0x01

        writer = threading.Thread(target=flip)
        writer.start()
        out = dev.alloc(n)
        try:
            dev.open_segments(staging, out, params, ctx, ctx.count, n)
            assert dev.as_array(out, np.uint8).tobytes() == plain
            outcomes.add("opened")
        except ChannelError:
            assert dev.verify_zero(out)
            outcomes.add("refused")
        finally:
            stop.set()
            writer.join()
            mapping.close()
            dev.release(staging)
    assert outcomes


def test_scrub_and_verify_zero(dev: HostDevice) -> None:
    buf = dev.alloc(4096)
    assert dev.verify_zero(buf)
    dev.as_array(buf, np.uint8)[4095] = 1
    assert not dev.verify_zero(buf)
    dev.scrub(buf)
    assert dev.verify_zero(buf)
    staging, handle = dev.alloc_hop_staging(4096)
    with HostDevice.map_staging(handle) as mapping:
        mapping.view[100] = 9
    assert not dev.verify_zero(staging)
    dev.scrub(staging)
    assert dev.verify_zero(staging)
    dev.release(staging)


def test_scrubbed_staging_is_let_go_of_so_a_holder_still_writing_cannot_fail_the_device(dev: HostDevice) -> None:
    staging, handle = dev.alloc_hop_staging(4096)
    mapping = HostDevice.map_staging(handle)  # kept past the hop, as a hostile holder would
    mapping.view[:] = b"\x01" * 4096
    dev.scrub(staging)
    assert mapping.view[:4096] == bytes(4096)  # the device zeroed the shared pages
    mapping.view[:] = b"\x02" * 4096  # ... and the holder writes on
    assert dev.verify_zero(staging)  # the device reads none of it any more
    dev.scrub(staging)  # idempotent
    with pytest.raises(DeviceError, match="scrubbed"):
        dev.open_segments(staging, dev.alloc(16), ChannelParams.generate(handle, 0), SegmentContext("r", 1, "h", 1), 1, 0)
    dev.revoke_staging(staging)
    dev.release(staging)
    mapping.close()


def test_released_buffers_refuse_use(dev: HostDevice) -> None:
    buf = dev.alloc(16)
    dev.release(buf)
    assert buf.released
    for op in (dev.scrub, dev.verify_zero, dev.measure):
        with pytest.raises(DeviceError, match="released"):
            op(buf)


def test_bad_sizes_and_views_are_refused(dev: HostDevice) -> None:
    with pytest.raises(DeviceError, match=">= 0"):
        dev.alloc(-1)
    with pytest.raises(DeviceError, match=">= 1"):
        dev.alloc_hop_staging(0)
    with pytest.raises(DeviceError, match="float32"):
        dev.as_array(dev.alloc(6), np.float32)
    assert dev.as_array(dev.alloc(8), np.float32).shape == (2,)


def test_measurement_changes_on_any_one_byte_change(dev: HostDevice) -> None:
    w = dev.alloc(64)
    b = dev.alloc(32)
    dev.as_array(w, np.uint8)[:] = np.arange(64, dtype=np.uint8)
    base = dev.measure(w, b)
    assert len(base) == 32 and dev.measure(w, b) == base
    seen = {base}
    for buf in (w, b):
        view = dev.as_array(buf, np.uint8)
        for i in range(buf.nbytes):
            view[i] ^= 0x01
            seen.add(dev.measure(w, b))
            view[i] ^= 0x01
    assert len(seen) == 1 + 64 + 32
    assert dev.measure(w, b) == base


def test_measurement_binds_order_boundaries_dtype_and_shape() -> None:
    x = np.arange(12, dtype=np.float32)
    assert measure_model([x]) != measure_model([x.view(np.int32)])
    assert measure_model([x]) != measure_model([x.reshape(3, 4)])
    assert measure_model([x[:6], x[6:]]) != measure_model([x])
    assert measure_model([x[:6], x[6:]]) != measure_model([x[6:], x[:6]])
    assert measure_model([x.reshape(3, 4).T]) == measure_model([np.ascontiguousarray(x.reshape(3, 4).T)])
    assert measure_model([b"ab", b"c"]) != measure_model([b"a", b"bc"])


def test_code_measurement_binds_names_and_sources() -> None:
    base = measure_code({"a.py": b"x = 1\n", "b.py": b"y = 2\n"})
    assert base == measure_code({"b.py": b"y = 2\n", "a.py": b"x = 1\n"})
    assert base != measure_code({"a.py": b"x = 1\n", "b.py": b"y = 3\n"})
    assert base != measure_code({"a.py": b"x = 1\n", "c.py": b"y = 2\n"})
    assert base != measure_model([b"a.py", b"x = 1\n", b"b.py", b"y = 2\n"])


def test_large_measurement_uses_the_same_encoding() -> None:
    # The multithreaded path must hash the same bytes as the single-threaded one.
    big = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)
    descr = f"{big.dtype.str}{list(big.shape)}".encode()
    manual = blake3.blake3(
        struct.pack(">H", 14) + b"gtbus/model/v1"
        + struct.pack(">Q", len(descr)) + descr
        + struct.pack(">Q", big.nbytes) + big.tobytes()
    ).digest()
    assert measure_model([big]) == manual




NOBODY = 65534


def _become_nobody() -> None:  # pragma: no cover - runs in a forked child
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _probe_proc_as_nobody(pid: int) -> str:
    """From a forked child running as NOBODY: can it list ``/proc/PID/fd`` and open ``/proc/PID/mem``?"""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        try:
            _become_nobody()
            seen = []
            for probe in (lambda: os.listdir(f"/proc/{pid}/fd"), lambda: open(f"/proc/{pid}/mem", "rb").close()):
                try:
                    probe()
                    seen.append("open")
                except PermissionError:
                    seen.append("closed")
            os.write(w, " ".join(seen).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        out = fh.read().decode()
    os.waitpid(child, 0)
    return out


def test_a_process_that_exports_staging_is_closed_to_its_own_user(dev: HostDevice) -> None:
    # Same-user processes (other holders) must not reach the device through
    # /proc: not its descriptors (another hop's staging), not its memory.
    import ctypes

    dev.alloc_hop_staging(64)
    assert ctypes.CDLL(None).prctl(3, 0, 0, 0, 0) == 0  # PR_GET_DUMPABLE
    if os.getuid() != 0:
        pytest.skip("needs root to run a device and a prober as one unprivileged user")
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    device = os.fork()
    if device == 0:  # pragma: no cover - child: a device process of user NOBODY
        try:
            _become_nobody()
            ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # undo the kernel's reset on setuid: start open, like any process
            os.write(from_child, b"r")
            os.read(to_child, 1)
            HostDevice().alloc_hop_staging(64)
            os.write(from_child, b"e")
            os.read(to_child, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(to_parent, 1) == b"r"
        assert _probe_proc_as_nobody(device) == "open open"  # the control: an ordinary process is open to its user
        os.write(from_parent, b"g")
        assert os.read(to_parent, 1) == b"e"
        assert _probe_proc_as_nobody(device) == "closed closed"
    finally:
        os.write(from_parent, b"x")
        os.waitpid(device, 0)
        for fd in (to_child, from_parent, to_parent, from_child):
            os.close(fd)
