"""Node identities, key files and the deployment roster.

Every node has three key pairs, generated together and kept in one secret file:

* an **Ed25519** signing key: signs every message the node sends;
* an **X25519** key: the orchestrator seals each hop's channel key to it;
* a **CURVE** key (Curve25519): authenticates the node's ZeroMQ connections.

Keys are separate on purpose (no reuse of one secret across three protocols).
They are bound together by a *binding signature*: the Ed25519 key signs the
node's name, role and the two other public keys. The roster refuses a public
file whose binding does not verify, and the receive pipeline checks that the
CURVE key ZeroMQ authenticated belongs to the node named as the signer, so a
holder cannot send messages signed as itself over another node's connection.

Files: ``NAME.key`` (secret, JSON, mode 0600, refused if group/other can read
it) and ``NAME.pub`` (public, JSON, shared with the deployment).
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import nacl.exceptions
import nacl.public
import nacl.signing

from gtbus.errors import ConfigError, KeyFileError
from gtbus.private_files import write_private

_BINDING_DOMAIN = b"gtbus/identity/v1\x00"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class Role(str, Enum):
    """What a node is allowed to do; the message registry lists allowed senders by role."""

    ORCHESTRATOR = "orchestrator"
    HOLDER = "holder"
    AGENT = "agent"  # device agent on the GPU host (ship-to-device for remote holders)
    OBSERVER = "observer"  # status / monitoring, sends only requests for state


def check_node_name(name: str) -> str:
    """Return ``name`` if it is a valid node name, else raise KeyFileError naming it."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):  # fullmatch: "$" alone lets "h1\n" through
        raise KeyFileError(
            f"invalid node name {name!r}: use 1-63 of a-z, 0-9, '_', '.', '-', starting with a letter or digit"
        )
    return name


def _binding_message(name: str, role: Role, x25519: bytes, curve: bytes) -> bytes:
    n = name.encode()
    r = role.value.encode()
    return _BINDING_DOMAIN + bytes([len(n)]) + n + bytes([len(r)]) + r + x25519 + curve


@dataclass(frozen=True)
class PublicIdentity:
    """What the deployment knows about a node: its name, role and public keys."""

    name: str
    role: Role
    ed25519: bytes
    x25519: bytes
    curve: bytes
    binding: bytes

    def verify_key(self) -> nacl.signing.VerifyKey:
        """The node's Ed25519 verify key."""
        return nacl.signing.VerifyKey(self.ed25519)

    def check_binding(self) -> None:
        """Raise KeyFileError unless the Ed25519 key signed the other keys, name and role."""
        try:
            self.verify_key().verify(
                _binding_message(self.name, self.role, self.x25519, self.curve), self.binding
            )
        except (nacl.exceptions.BadSignatureError, ValueError) as exc:
            raise KeyFileError(f"public key of {self.name!r}: binding signature does not verify") from exc

    def to_json(self) -> dict[str, str]:
        """The ``NAME.pub`` file content."""
        return {
            "name": self.name,
            "role": self.role.value,
            "ed25519": self.ed25519.hex(),
            "x25519": self.x25519.hex(),
            "curve": self.curve.hex(),
            "binding": self.binding.hex(),
        }

    @classmethod
    def from_json(cls, data: object, source: str = "public key") -> "PublicIdentity":
        """Parse and verify a ``NAME.pub`` mapping; raise KeyFileError naming ``source``."""
        if not isinstance(data, dict):
            raise KeyFileError(f"{source}: expected a JSON object")
        try:
            ident = cls(
                name=check_node_name(data["name"]),
                role=Role(data["role"]),
                ed25519=_hex_field(data, "ed25519", 32, source),
                x25519=_hex_field(data, "x25519", 32, source),
                curve=_hex_field(data, "curve", 32, source),
                binding=_hex_field(data, "binding", 64, source),
            )
        except KeyError as exc:
            raise KeyFileError(f"{source}: missing field {exc.args[0]!r}") from None
        except ValueError as exc:
            raise KeyFileError(f"{source}: {exc}") from None
        try:
            ident.check_binding()
        except KeyFileError as exc:  # say which file, not only which node
            raise KeyFileError(f"{source}: {exc}") from None
        return ident


def _hex_field(data: Mapping[str, object], field: str, size: int, source: str) -> bytes:
    value = data[field]
    if not isinstance(value, str):
        raise KeyFileError(f"{source}: field {field!r} must be a hex string")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise KeyFileError(f"{source}: field {field!r} is not valid hex") from None
    if len(raw) != size:
        raise KeyFileError(f"{source}: field {field!r} must be {size} bytes, got {len(raw)}")
    return raw


@dataclass(frozen=True)
class NodeIdentity:
    """A node's secret keys. Never logged, never sent; only :attr:`public` leaves the node."""

    name: str
    role: Role
    signing_key: nacl.signing.SigningKey
    x25519_secret: nacl.public.PrivateKey
    curve_secret: nacl.public.PrivateKey

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return f"NodeIdentity(name={self.name!r}, role={self.role.value!r})"

    @classmethod
    def generate(cls, name: str, role: Role | str) -> "NodeIdentity":
        """Fresh keys for a new node."""
        return cls(
            name=check_node_name(name),
            role=Role(role),
            signing_key=nacl.signing.SigningKey.generate(),
            x25519_secret=nacl.public.PrivateKey.generate(),
            curve_secret=nacl.public.PrivateKey.generate(),
        )

    @property
    def public(self) -> PublicIdentity:
        """The public half, with its binding signature."""
        x = bytes(self.x25519_secret.public_key)
        c = bytes(self.curve_secret.public_key)
        binding = self.signing_key.sign(_binding_message(self.name, self.role, x, c)).signature
        return PublicIdentity(
            name=self.name,
            role=self.role,
            ed25519=bytes(self.signing_key.verify_key),
            x25519=x,
            curve=c,
            binding=binding,
        )

    @property
    def curve_secret_bytes(self) -> bytes:
        """Raw 32-byte CURVE secret key (the transport z85-encodes it)."""
        return bytes(self.curve_secret)

    def sign(self, data: bytes) -> bytes:
        """Detached 64-byte Ed25519 signature of ``data``."""
        return self.signing_key.sign(data).signature

    def to_json(self) -> dict[str, str]:
        """The ``NAME.key`` file content (secret)."""
        return {
            "name": self.name,
            "role": self.role.value,
            "ed25519_seed": bytes(self.signing_key).hex(),
            "x25519_secret": bytes(self.x25519_secret).hex(),
            "curve_secret": bytes(self.curve_secret).hex(),
        }

    @classmethod
    def from_json(cls, data: object, source: str = "secret key") -> "NodeIdentity":
        """Parse a ``NAME.key`` mapping; raise KeyFileError naming ``source``."""
        if not isinstance(data, dict):
            raise KeyFileError(f"{source}: expected a JSON object")
        try:
            return cls(
                name=check_node_name(data["name"]),
                role=Role(data["role"]),
                signing_key=nacl.signing.SigningKey(_hex_field(data, "ed25519_seed", 32, source)),
                x25519_secret=nacl.public.PrivateKey(_hex_field(data, "x25519_secret", 32, source)),
                curve_secret=nacl.public.PrivateKey(_hex_field(data, "curve_secret", 32, source)),
            )
        except KeyError as exc:
            raise KeyFileError(f"{source}: missing field {exc.args[0]!r}") from None
        except ValueError as exc:
            raise KeyFileError(f"{source}: {exc}") from None


def write_identity(identity: NodeIdentity, out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.key`` (0600 from its creation, never through a symlink) and ``NAME.pub``."""
    out = Path(out_dir)
    key_path = out / f"{identity.name}.key"
    pub_path = out / f"{identity.name}.pub"
    if not overwrite and (os.path.lexists(key_path) or os.path.lexists(pub_path)):
        raise KeyFileError(f"{key_path}: already exists (refusing to overwrite keys)")
    # A fresh 0600 file renamed over the old one: --force over a 0644 key or a
    # planted NAME.key.tmp symlink can neither loosen the mode nor redirect the secret.
    try:
        write_private(key_path, json.dumps(identity.to_json(), indent=1) + "\n", overwrite=overwrite)
        write_private(pub_path, json.dumps(identity.public.to_json(), indent=1) + "\n", overwrite=overwrite, mode=0o644)
    except ConfigError as exc:
        raise KeyFileError(str(exc)) from None
    return key_path, pub_path


def _read_json(path: Path) -> object:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeyFileError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_identity(path: str | os.PathLike[str]) -> NodeIdentity:
    """Load a secret key file, refusing one that group or others can read or write."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"{p}: no such key file") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{p}: permissions {stat.S_IMODE(mode):04o} are too open; run chmod 600 {p}")
    return NodeIdentity.from_json(_read_json(p), source=str(p))


def load_public(path: str | os.PathLike[str]) -> PublicIdentity:
    """Load and verify a ``NAME.pub`` file."""
    p = Path(path)
    return PublicIdentity.from_json(_read_json(p), source=str(p))


class Roster:
    """The deployment: every node's public identity, looked up by name or CURVE key.

    Only nodes in the roster can connect (ZAP), and only their signatures count.
    """

    def __init__(self, members: Iterable[PublicIdentity]) -> None:
        self._by_name: dict[str, PublicIdentity] = {}
        self._by_curve: dict[bytes, PublicIdentity] = {}
        for m in members:
            if m.name in self._by_name:
                raise KeyFileError(f"roster: node {m.name!r} listed twice")
            if m.curve in self._by_curve:
                raise KeyFileError(f"roster: nodes {m.name!r} and {self._by_curve[m.curve].name!r} share a CURVE key")
            self._by_name[m.name] = m
            self._by_curve[m.curve] = m

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str]) -> "Roster":
        """Every ``*.pub`` file in ``directory``."""
        d = Path(directory)
        if not d.is_dir():
            raise KeyFileError(f"{d}: no such key directory")
        pubs = sorted(d.glob("*.pub"))
        if not pubs:
            raise KeyFileError(f"{d}: no *.pub files (run `gtbus keygen NAME --out {d}`)")
        return cls(load_public(p) for p in pubs)

    def get(self, name: str) -> PublicIdentity | None:
        """The node called ``name``, or None."""
        return self._by_name.get(name)

    def __getitem__(self, name: str) -> PublicIdentity:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[PublicIdentity]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def by_role(self, role: Role) -> list[PublicIdentity]:
        """Members with ``role``, sorted by name."""
        return sorted((m for m in self._by_name.values() if m.role is role), key=lambda m: m.name)

    def curve_names(self) -> dict[bytes, str]:
        """CURVE public key -> node name, what the ZAP handler admits."""
        return {k: v.name for k, v in self._by_curve.items()}
