"""The layer order of DESIGN.md section 3, read from the import graph, so that it stays true.

Every ``import`` of a gtbus module in ``gtbus/**.py`` counts, lazy ones inside
functions too (a lazy import is still a dependency: ``nodes/launcher.py``
importing ``cli`` made a cycle that way). Layers, bottom up::

    errors clock console private_files bounded_read   base: import nothing of gtbus but each other
    messages/
    gpu/ training/ recording               siblings may import each other
    protocol/ attest/                      (attest: the appraisal of evidence; gpu's errors below it)
    transport/
    nodes/
    bench/ replay/ runbook/ testing/       tools; they may use gtbus.testing, nodes never do
    cli/ (and gtbus/__main__.py)
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import gtbus

SRC = Path(gtbus.__file__).parent

RANK = {
    "errors": 0, "clock": 0, "console": 0, "private_files": 0, "bounded_read": 0,
    "messages": 1,
    "gpu": 2, "training": 2, "recording": 2,
    "protocol": 3, "attest": 3,
    "provenance": 3,  # manifests, receipts, chunk commitments: over messages and private_files
    "transport": 4,
    "nodes": 5,
    "bench": 6, "replay": 6, "runbook": 6, "testing": 6,
    "export": 6,  # the trained model as files, and text from it: a tool over training, gpu and nodes
    "cli": 7, "__main__": 7, "": 7,  # "": gtbus/__init__.py, the public face
}
#: Imports within one layer, between different parts of it, that are allowed.
SIBLINGS = {
    ("private_files", "errors"), ("console", "errors"), ("clock", "errors"), ("bounded_read", "errors"),
    ("gpu", "training"), ("training", "gpu"), ("gpu", "recording"), ("training", "recording"),
    ("bench", "testing"), ("replay", "testing"), ("runbook", "testing"),
    ("__main__", "cli"),
}
#: Where pyzmq may be imported: the zmq transport, and the raw-pyzmq baselines the bus and ship benchmarks compare against.
ZMQ_IMPORTERS = ("transport/zmq/", "bench/bus.py", "bench/stream.py")


def _part(module: str) -> str:
    """The layer part of a dotted gtbus module name: ``gtbus.nodes.x`` -> ``nodes``; ``gtbus`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every absolute import in a file; ``from gtbus import x`` names gtbus.x."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "gtbus":
                for alias in node.names:
                    yield f"gtbus.{alias.name}", node.lineno
            else:
                yield node.module, node.lineno


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


EDGES = [(mod, path, target, line) for mod, path in _modules() for target, line in _imports(path)]
GTBUS_EDGES = [e for e in EDGES if e[2] == "gtbus" or e[2].startswith("gtbus.")]


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(SRC.parent)}:{line}"


def test_the_graph_is_read() -> None:
    # The checks below mean something only if the walk found the imports there are.
    assert len({m for m, *_ in GTBUS_EDGES}) > 80
    assert ("gtbus.nodes.orchestrator", "gtbus.protocol.token") in {(m, t) for m, _, t, _ in GTBUS_EDGES}
    assert {_part(m) for m, *_ in GTBUS_EDGES} <= set(RANK), "a new top-level part of gtbus needs a place in RANK"


def _layer_violations(edges: list[tuple[str, Path, str, int]]) -> list[str]:
    wrong = []
    for mod, path, target, line in edges:
        a, b = _part(mod), _part(target)
        if a == b:
            continue
        if b not in RANK:
            wrong.append(f"{_where(path, line)}: {mod} imports {target}, which has no layer")
        elif RANK[b] > RANK[a] or (RANK[b] == RANK[a] and (a, b) not in SIBLINGS):
            wrong.append(f"{_where(path, line)}: {mod} ({a or 'gtbus'}) imports {target} ({b}), not below it")
    return wrong


def test_each_layer_imports_only_the_ones_below_it() -> None:
    wrong = _layer_violations(GTBUS_EDGES)
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(("forbidden", "allowed"), [
    ("gtbus.cli", {"cli", "__main__"}),
    ("gtbus.bench", {"bench", "cli"}),
    ("gtbus.testing", {"testing", "bench", "replay", "runbook", "cli"}),
])
def test_upper_layers_are_named_only_above(forbidden: str, allowed: set[str]) -> None:
    # Production code (nodes and below) never imports the command line, the benchmarks or gtbus.testing.
    wrong = [
        f"{_where(path, line)}: {mod} imports {target}"
        for mod, path, target, line in GTBUS_EDGES
        if (target == forbidden or target.startswith(forbidden + ".")) and _part(mod) not in allowed
    ]
    assert not wrong, "\n".join(wrong)


def test_only_the_zmq_transport_imports_pyzmq() -> None:
    wrong = [
        _where(path, line)
        for _, path, target, line in EDGES
        if (target == "zmq" or target.startswith("zmq."))
        and not str(path.relative_to(SRC)).startswith(ZMQ_IMPORTERS)
    ]
    assert not wrong, "pyzmq imported outside the zmq transport: " + ", ".join(wrong)


#: Where the zmq transport may be named: inside the transport, the wiring that builds it from identities, the tools.
ZMQ_TRANSPORT_USERS = ("transport/", "nodes/wiring.py", "bench/", "cli/")


def _zmq_transport_lines(tree: ast.AST) -> list[int]:
    """Lines of ``tree`` that import the zmq transport, or one of its names through ``gtbus.transport``."""
    from gtbus.transport import zmq

    names = {*zmq.__all__, "zmq"}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("gtbus.transport.zmq") or (
                node.module == "gtbus.transport" and any(a.name in names for a in node.names)
            ):
                lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(a.name.startswith("gtbus.transport.zmq") for a in node.names):
            lines.append(node.lineno)
    return lines


def test_only_the_wiring_and_the_tools_name_the_zmq_transport() -> None:
    # The node shells, gtbus.testing and the simulator take any transport: they run without pyzmq
    # (tests/transport/test_lazy_zmq.py checks that at run time; this, for every module).
    wrong = [
        _where(path, line)
        for _, path in _modules()
        if not str(path.relative_to(SRC)).startswith(ZMQ_TRANSPORT_USERS)
        for line in _zmq_transport_lines(ast.parse(path.read_text(), str(path)))
    ]
    assert not wrong, "the zmq transport named outside the wiring and the tools: " + ", ".join(wrong)
    # ... and the check can fail:
    assert _zmq_transport_lines(ast.parse(
        "from gtbus.transport import ZmqServer\n"
        "import gtbus.transport.zmq.keys\n"
        "from gtbus.transport import MemoryNetwork, Delivery\n"
        "from gtbus.transport.zmq.pipe import Pipe\n"
        "from gtbus.transport import zmq\n"
    )) == [1, 2, 4, 5]


def test_a_violation_is_found() -> None:
    # The check itself can fail: the cycle this test was written after, and a sibling reaching across.
    launcher = SRC / "nodes" / "launcher.py"
    found = _layer_violations([
        ("gtbus.nodes.launcher", launcher, "gtbus.cli.nodes", 84),
        ("gtbus.messages.types", launcher, "gtbus.protocol.token", 1),
        ("gtbus.replay.view", launcher, "gtbus.bench.report", 2),
        ("gtbus.nodes.launcher", launcher, "gtbus.transport.base", 3),
    ])
    assert found == [
        "gtbus/nodes/launcher.py:84: gtbus.nodes.launcher (nodes) imports gtbus.cli.nodes (cli), not below it",
        "gtbus/nodes/launcher.py:1: gtbus.messages.types (messages) imports gtbus.protocol.token (protocol), not below it",
        "gtbus/nodes/launcher.py:2: gtbus.replay.view (replay) imports gtbus.bench.report (bench), not below it",
    ]
