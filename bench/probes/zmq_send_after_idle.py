"""What one libzmq send costs after the context's I/O thread idled (bench/notes-perf.md, "what one send costs").

Plain pyzmq, no gtbus code: a CURVE DEALER connected to a ROUTER over
loopback sends one 4-frame message of a signed Echo's frame sizes, 2,000
times per row, busy-waiting between sends so that only the I/O thread idles.
Run: python bench/probes/zmq_send_after_idle.py
"""

from __future__ import annotations

import statistics
import time

import zmq


def main() -> None:
    ctx = zmq.Context()
    server_pub, server_sec = zmq.curve_keypair()
    client_pub, client_sec = zmq.curve_keypair()
    router = ctx.socket(zmq.ROUTER)
    router.curve_server = True
    router.curve_secretkey, router.curve_publickey = server_sec, server_pub
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.curve_serverkey, dealer.curve_publickey, dealer.curve_secretkey = server_pub, client_pub, client_sec
    dealer.sndhwm = router.rcvhwm = 100_000  # the drain below runs only every 50 sends
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hello")
    router.recv_multipart()
    frames = [b"\x01" * 8, b"h" * 120, b"b" * 80, b"s" * 64]
    print("time since the previous send | median us | p90 us")
    for label, gap in (("back to back", 0.0), ("0.3 ms", 0.0003), ("2 ms", 0.002)):
        took = []
        for i in range(2000):
            end = time.perf_counter() + gap
            while time.perf_counter() < end:  # the sender stays awake; only the I/O thread idles
                pass
            t = time.perf_counter()
            for j, f in enumerate(frames):
                dealer.send(f, zmq.NOBLOCK | (zmq.SNDMORE if j < len(frames) - 1 else 0), copy=True)
            took.append((time.perf_counter() - t) * 1e6)
            if i % 50 == 0:
                while router.poll(0):
                    router.recv_multipart()
        while router.poll(10):
            router.recv_multipart()
        took.sort()
        print(f"{label} | {statistics.median(took):.1f} | {took[int(0.9 * (len(took) - 1))]:.1f}")
    dealer.close(0)
    router.close(0)
    ctx.term()


if __name__ == "__main__":
    main()
