"""pyzmq is imported only when a zmq transport is asked for.

The memory transport, ``gtbus.testing`` and the simulator run whole
deployments in one process; they must not load libzmq (nor need it installed).
Each check runs in a fresh interpreter: this one has imported zmq long ago.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(60)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=50)


def test_the_memory_transport_and_the_simulator_do_not_import_zmq() -> None:
    done = _python("""
        import sys
        import gtbus.transport
        import gtbus.transport.memory
        import gtbus.testing
        import gtbus.testing.sim
        import gtbus.nodes.runtime
        loaded = sorted(m for m in sys.modules if m == "zmq" or m.startswith("zmq."))
        print("zmq modules:", loaded)
        assert not loaded, loaded
    """)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "zmq modules: []" in done.stdout


def test_a_memory_round_trip_needs_no_pyzmq() -> None:
    # sys.modules["zmq"] = None makes every "import zmq" fail, as if pyzmq were not installed.
    done = _python("""
        import sys
        sys.modules["zmq"] = None
        import asyncio
        from gtbus.transport import MemoryNetwork

        async def main():
            net = MemoryNetwork()
            server, client = net.server("orch"), net.client("h1")
            await server.start()
            await client.start()
            await client.send([b"ping"])
            got = await server.recv()
            await server.send(got.peer, [b"pong"])
            print((got.peer, got.frames), (await client.recv()).frames)

        asyncio.run(main())
        try:
            from gtbus.transport import ZmqServer
        except ImportError as e:
            print("zmq asked for: ImportError" if isinstance(e, ImportError) else e)
    """)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["('h1', [b'ping']) [b'pong']", "zmq asked for: ImportError"]


def test_asking_for_a_zmq_name_imports_it() -> None:
    done = _python("""
        import sys
        import gtbus.transport as t
        assert "zmq" not in sys.modules
        from gtbus.transport import ZmqServer, SocketTuning
        from gtbus.transport.zmq import ZmqServer as Direct
        assert ZmqServer is Direct and "zmq" in sys.modules
        from gtbus.transport import zmq
        assert {n for n in t.__all__ if getattr(t, n) is getattr(zmq, n, None)} == set(zmq.__all__)
        try:
            t.NoSuchThing
        except AttributeError as e:
            print(e)
    """)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "module 'gtbus.transport' has no attribute 'NoSuchThing'"
