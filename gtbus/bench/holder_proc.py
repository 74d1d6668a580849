"""A long-lived holder process for the device benchmark (``python -m gtbus.bench.holder_proc``).

Like a real holder it lives across hops (its CUDA context and pinned pool are
made once), holds its plaintext in its own memory, and for each request maps
the hop's staging by handle, seals into it, and unmaps. Requests and answers
are JSON lines on stdin/stdout; the channel params travel hex-encoded msgpack,
as inside a sealed grant (the benchmark measures provisioning, not sealing the
grant, which the control-overhead figure covers).
"""

from __future__ import annotations

import json
import os
import sys
import time

import msgpack
import numpy as np


def main() -> None:
    """Serve seal requests until stdin closes."""
    backend = sys.argv[1]
    nbytes = int(sys.argv[2])
    from gtbus.gpu.backends import device_class
    from gtbus.gpu.channel import ChannelParams, SegmentContext

    cls = device_class(backend)
    plain = np.frombuffer(os.urandom(nbytes), dtype=np.uint8)  # this holder's data, in its own memory
    baseline: dict[str, float] = {}
    if backend == "cupy":
        import cupy

        dev = cupy.cuda.Device(0)
        dev.use()
        pinned = cupy.cuda.alloc_pinned_memory(nbytes)
        host = np.frombuffer(pinned, dtype=np.uint8, count=nbytes)
        host[:] = plain
        dst = cupy.empty(nbytes, dtype=cupy.uint8)
        for label, src in (("pinned_h2d_gbps", host), ("pageable_h2d_gbps", plain)):
            times = []
            for _ in range(5):
                cupy.cuda.runtime.deviceSynchronize()
                t = time.perf_counter()
                cupy.cuda.runtime.memcpy(dst.data.ptr, src.ctypes.data, nbytes, cupy.cuda.runtime.memcpyHostToDevice)
                cupy.cuda.runtime.deviceSynchronize()
                times.append(time.perf_counter() - t)
            baseline[label] = nbytes / sorted(times)[len(times) // 2] / 1e9
        del dst
    else:
        out = np.empty_like(plain)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            np.copyto(out, plain)
            times.append(time.perf_counter() - t)
        baseline["memcpy_gbps"] = nbytes / sorted(times)[len(times) // 2] / 1e9
    print(json.dumps({"ready": True, **baseline}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        params = ChannelParams.from_wire(msgpack.unpackb(bytes.fromhex(req["params"]), raw=False))
        ctx = SegmentContext(req["run"], req["epoch"], "h1", req["count"])
        t0 = time.perf_counter()
        m = cls.map_staging(params.buffer_handle)
        t1 = time.perf_counter()
        s = m.seal_into(memoryview(plain)[: req["nbytes"]], params, ctx)
        t2 = time.perf_counter()
        cls.unmap(m)
        t3 = time.perf_counter()
        print(json.dumps({"map_s": t1 - t0, "seal_s": t2 - t1, "unmap_s": t3 - t2, "count": s.count}), flush=True)


if __name__ == "__main__":
    main()
