"""The message registry: every type declared once, with who may send it.

Dispatch goes through :data:`REGISTRY` only. A type name read off the wire is
looked up in a dict of declared specs; it is never used with ``getattr`` or an
import (SaltStack CVE-2020-11651 was exactly that mistake).

A message class is a frozen dataclass decorated with :func:`message`. Its
fields' annotations are the schema: a body decoded from the wire must have
exactly those keys with values of exactly those types, or it is refused.
Supported field types: ``int``, ``float``, ``str``, ``bytes``, ``bool``,
``list[T]``, ``dict[str, Any]`` (an opaque map of plain values),
``T | None``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from gtbus.errors import RejectedMessage
from gtbus.messages.identity import Role


@dataclass(frozen=True)
class MessageSpec:
    """What the registry knows about one message type."""

    name: str
    cls: type
    senders: frozenset[Role]
    broadcast: bool  # may be sent to recipient "*" over the event channel
    fenced: bool  # carries a token epoch; anything older than the receiver's fence is refused
    max_blobs: int  # raw frames after the signature (bulk data never goes inside msgpack)
    fields: tuple[tuple[str, Any], ...]
    doc: str


REGISTRY: dict[str, MessageSpec] = {}
_BY_CLASS: dict[type, MessageSpec] = {}
#: per declared type: (field names, ((name, check, widen int to float), ...)), built once at declaration
_COMPILED: dict[str, tuple[frozenset[str], tuple[tuple[str, Callable[[Any], bool], bool], ...]]] = {}

M = TypeVar("M")


def message(
    name: str,
    *,
    senders: set[Role] | frozenset[Role],
    broadcast: bool = False,
    fenced: bool = False,
    max_blobs: int = 0,
) -> Callable[[type[M]], type[M]]:
    """Declare a message type: its wire name, allowed sender roles and delivery rules."""

    def wrap(cls: type[M]) -> type[M]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        if name in REGISTRY:
            raise TypeError(f"message type {name!r} declared twice")
        hints = typing.get_type_hints(cls)
        fields = tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))
        for fname, ftype in fields:
            _check_supported(ftype, f"{cls.__name__}.{fname}")
        spec = MessageSpec(
            name=name,
            cls=cls,
            senders=frozenset(senders),
            broadcast=broadcast,
            fenced=fenced,
            max_blobs=max_blobs,
            fields=fields,
            doc=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
        )
        REGISTRY[name] = spec
        _BY_CLASS[cls] = spec
        _COMPILED[name] = _compile_spec(spec)
        return cls

    return wrap


def spec_of(msg: object) -> MessageSpec:
    """The spec of a message instance (TypeError if the class was never declared)."""
    try:
        return _BY_CLASS[type(msg)]
    except KeyError:
        raise TypeError(f"{type(msg).__name__} is not a declared message type") from None


def _check_supported(tp: Any, where: str) -> None:
    origin = typing.get_origin(tp)
    if tp in (int, float, str, bytes, bool):
        return
    if origin in (list,):
        _check_supported(typing.get_args(tp)[0], where)
        return
    if origin is dict:
        key, _ = typing.get_args(tp)
        if key is not str:
            raise TypeError(f"{where}: dict keys must be str")
        return
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if a is not type(None):
                _check_supported(a, where)
        return
    raise TypeError(f"{where}: unsupported field type {tp!r}")


def _value_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp in (str, bytes):
        return isinstance(value, tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, list) and all(_value_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if origin in (typing.Union, types.UnionType):
        return any(
            (value is None) if a is type(None) else _value_ok(value, a) for a in typing.get_args(tp)
        )
    return False


def _compile(tp: Any) -> Callable[[Any], bool]:
    """A check equivalent to ``_value_ok(value, tp)``, with the typing work done once."""
    origin = typing.get_origin(tp)
    if tp is bool:
        return lambda v: isinstance(v, bool)
    if tp is int:
        return lambda v: isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp in (str, bytes):
        return lambda v: isinstance(v, tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        check = _compile(inner)
        return lambda v: isinstance(v, list) and all(check(x) for x in v)
    if origin is dict:
        return lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)
    if origin in (typing.Union, types.UnionType):
        alts = tuple((lambda v: v is None) if a is type(None) else _compile(a) for a in typing.get_args(tp))
        return lambda v: any(c(v) for c in alts)
    return lambda v: False


def _compile_spec(spec: MessageSpec) -> tuple[frozenset[str], tuple[tuple[str, Callable[[Any], bool], bool], ...]]:
    return (
        frozenset(fname for fname, _ in spec.fields),
        tuple((fname, _compile(ftype), ftype is float) for fname, ftype in spec.fields),
    )


def body_to_wire(msg: object) -> dict[str, Any]:
    """A message's fields as a plain dict for msgpack."""
    spec = spec_of(msg)
    return {fname: getattr(msg, fname) for fname, _ in spec.fields}


def body_from_wire(spec: MessageSpec, body: Any) -> Any:
    """Build a message from a decoded body, refusing missing, extra or mistyped fields."""
    if not isinstance(body, dict):
        raise RejectedMessage("bad-body", f"{spec.name}: body is not a map")
    compiled = _COMPILED.get(spec.name)
    if compiled is not None and REGISTRY.get(spec.name) is spec and body.keys() == compiled[0]:
        # Fast path (exactly the declared keys): the same checks, prepared at declaration.
        kwargs: dict[str, Any] = {}
        for fname, check, widen in compiled[1]:
            value = body[fname]
            if not check(value):
                raise RejectedMessage("bad-body", f"{spec.name}: field {fname!r} has wrong type {type(value).__name__}")
            if widen and isinstance(value, int):
                value = float(value)
            kwargs[fname] = value
        try:
            return spec.cls(**kwargs)
        except (TypeError, ValueError) as exc:  # __post_init__ validation
            raise RejectedMessage("bad-body", f"{spec.name}: {exc}") from None
    expected = {fname for fname, _ in spec.fields}
    extra = set(body) - expected
    if extra:
        raise RejectedMessage("bad-body", f"{spec.name}: unknown field(s) {sorted(map(str, extra))}")
    kwargs = {}
    for fname, ftype in spec.fields:
        if fname not in body:
            raise RejectedMessage("bad-body", f"{spec.name}: missing field {fname!r}")
        value = body[fname]
        if not _value_ok(value, ftype):
            raise RejectedMessage("bad-body", f"{spec.name}: field {fname!r} has wrong type {type(value).__name__}")
        if ftype is float and isinstance(value, int):
            value = float(value)
        kwargs[fname] = value
    try:
        return spec.cls(**kwargs)
    except (TypeError, ValueError) as exc:  # __post_init__ validation
        raise RejectedMessage("bad-body", f"{spec.name}: {exc}") from None
