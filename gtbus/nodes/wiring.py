"""Building a node's transport from its identity and the deployment roster.

CURVE keys come from the node identities (see :mod:`gtbus.messages.identity`):
the server admits exactly the roster's CURVE keys, each bound to its node name,
and clients pin the orchestrator's CURVE key. This module brings in the zmq
transport (and pyzmq); the node shells themselves take any transport, so the
in-process deployments of ``gtbus.testing`` never import it.
"""

from __future__ import annotations

from gtbus.errors import ConfigError
from gtbus.messages.identity import NodeIdentity, Role, Roster
from gtbus.transport.base import SubscribeHook
from gtbus.transport.zmq import CurveClientConfig, CurveServerConfig, ZmqClient, ZmqServer


def orchestrator_of(roster: Roster) -> str:
    """The name of the deployment's single orchestrator."""
    orchs = roster.by_role(Role.ORCHESTRATOR)
    if len(orchs) != 1:
        raise ConfigError(f"the deployment must have exactly one orchestrator, the keys name {len(orchs)}")
    return orchs[0].name


def server_transport(
    identity: NodeIdentity, roster: Roster, router: str, pub: str, *, on_subscribe: SubscribeHook | None = None
) -> ZmqServer:
    """The orchestrator's ROUTER + XPUB with CURVE, admitting only the roster's keys."""
    allowed = {m.curve: m.name for m in roster if m.name != identity.name}
    return ZmqServer(
        identity.name,
        router,
        pub,
        CurveServerConfig.from_secret(identity.curve_secret_bytes),
        allowed,
        on_subscribe=on_subscribe,
    )


def client_transport(identity: NodeIdentity, roster: Roster, router: str, pub: str, *, server_name: str | None = None) -> ZmqClient:
    """A node's DEALER + SUB with CURVE, pinning the server's key (the orchestrator's unless named)."""
    name = server_name or orchestrator_of(roster)
    if name not in roster:
        raise ConfigError(f"no public key of {name!r} in the deployment")
    server = roster[name]
    return ZmqClient(
        identity.name,
        router,
        pub,
        CurveClientConfig.from_secret(identity.curve_secret_bytes, server.curve),
        server_name=server.name,
    )
