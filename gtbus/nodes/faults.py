"""Failure injection for drills and tests, in one place, wrapped around the nodes rather than woven into them.

Nothing here runs in production: every fault is named on the hidden ``--fault``
option (or given by a test), and with no fault named the wrappers are not used.

The orchestrator: a hook called once per hop, after the holder's return and
before the model and code are measured again (``-`` or ``_`` alike):

* ``tamper-model-at-epoch=N``: flip one bit of the first parameter during hop N;
* ``tamper-model-after-epoch=N``: flip that bit after hop N has ended (trained,
  checkpointed, published), before the next hop on its lane: the next hop's
  remeasure must see it, since its grant reports hop N's measurement after training;
* ``tamper-code-at-epoch=N``: swap the code of one trainer method (``evaluate``)
  during hop N;
* ``fail-device-at-epoch=N``: the device of hop N's lane fails (a
  :class:`~gtbus.errors.DeviceError` out of the hop).

A tamper rolls the hop that sees it back (and after a code change, the run stops); a
failed device retires its lane (the hop goes back to the schedule).

A holder (:class:`HolderFaults`, ``name[=value],...``): the staging writes go
through :class:`FaultyStaging`, a wrapper around the device class whose mapping
writes what the drill says instead of the sealed chunk; three hooks sit at
named points of the holder's hop (:meth:`HolderFaults.decline_reason`,
:meth:`HolderFaults.after_ack`, :meth:`HolderFaults.before_return`).

A spec that names no fault is a one-line error.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Final

from gtbus.errors import ConfigError, DeviceError, GtbusError
from gtbus.gpu.channel import ChannelParams, SealSummary, SegmentContext, staging_size
from gtbus.gpu.device import BufferHandle, StagingWriter

FAULT_KINDS: Final = ("tamper-model-at-epoch", "tamper-model-after-epoch", "tamper-code-at-epoch", "fail-device-at-epoch")

#: What the orchestrator calls during each hop (``when`` = "during", after the return) and at its
#: end ("after"): (the hop's lane, or anything with its ``token`` and ``trainer``; the hop's assignment; when).
TamperHook = Callable[[Any, Any, str], None]


def orchestrator_fault_hook(spec: str) -> TamperHook | None:
    """The hook for ``spec`` (see the module's docstring), or None for an empty spec."""
    if not spec:
        return None
    name, _, value = spec.strip().partition("=")
    kind = name.replace("_", "-")
    if kind not in FAULT_KINDS:
        raise ConfigError(f"unknown orchestrator fault {name!r} ({' or '.join(k + '=N' for k in FAULT_KINDS)})")
    try:
        at = int(value)
    except ValueError:
        raise ConfigError(f"{kind} needs an epoch number, not {value!r}") from None

    def tamper(orch: Any, assignment: Any, when: str = "during") -> None:
        if orch.token.epoch != at or (when == "after") != (kind == "tamper-model-after-epoch"):
            return
        if kind == "fail-device-at-epoch":
            raise DeviceError(f"injected device failure during hop {at}")
        if kind in ("tamper-model-at-epoch", "tamper-model-after-epoch"):
            flat = orch.trainer.parameter_views()[0].reshape(-1).view("uint8")
            flat[0] ^= 1
        else:
            fn = type(orch.trainer).evaluate
            fn.__code__ = fn.__code__.replace(co_consts=fn.__code__.co_consts + ("tampered",))

    return tamper


@dataclass
class HolderFaults:
    """A holder's drills (never set in production).

    ``garbage``: write random bytes instead of ciphertext. ``replay_previous``:
    write the previous hop's ciphertext again. ``map_old``: try to map the
    previous hop's staging handle before writing. ``stall``: sleep this many
    seconds after acking (to overrun the lease). ``exit_mid_provision``: kill
    this process (SIGKILL) after acking, half-way through writing.
    ``stop_after_ack``: once, right after acking a grant, before writing,
    stop this process (SIGSTOP): a holder paused while it holds the token, at a
    point a test can wait for instead of racing a signal into a window.
    ``stop_before_return``: once, with the chunk written and the return about
    to leave, stop this process (SIGSTOP) right there, so a test can resume it
    past its lease (a paused ex-holder whose return arrives late).
    ``dump_to=PATH``: after each hop, copy the ciphertext this holder wrote
    into staging to PATH. ``replay_from=PATH``: write the bytes of PATH
    (another holder's ``dump_to``) into staging instead of sealing its chunk.
    ``decline_with=TEXT``: decline every grant with TEXT as the reason (a hostile
    holder's text: newlines, terminal escapes).
    """

    garbage: bool = False
    replay_previous: bool = False
    map_old: bool = False
    stall: float = 0.0
    exit_mid_provision: bool = False
    stop_after_ack: bool = False
    stop_before_return: bool = False
    dump_to: str = ""
    replay_from: str = ""
    decline_with: str = ""

    @classmethod
    def parse(cls, spec: str) -> HolderFaults:
        """Parse ``name[=value],...`` (e.g. ``garbage`` or ``stall=5``)."""
        f = cls()
        names = {fd.name for fd in fields(cls)}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, value = part.partition("=")
            name = name.replace("-", "_")
            if name not in names:
                raise GtbusError(f"unknown fault {name!r}")
            kind = type(getattr(f, name))
            if kind is str and not value:
                raise GtbusError(f"fault {name} needs a value ({name}=...)")
            setattr(f, name, float(value) if kind is float else value if kind is str else True)
        return f

    @property
    def writes(self) -> bool:
        """Does any drill change what is written to staging (so the writes must go through :class:`FaultyStaging`)?"""
        return bool(self.garbage or self.replay_previous or self.map_old or self.exit_mid_provision or self.dump_to or self.replay_from)

    def decline_reason(self, reason: str | None) -> str | None:
        """The reason to decline a grant with: the machine's, or the drill's for every grant."""
        return self.decline_with or reason

    async def after_ack(self) -> None:
        """Between the ack and the write: stop here once, or overrun the lease, if asked."""
        if self.stop_after_ack:
            self.stop_after_ack = False  # once: the retry should go through
            os.kill(os.getpid(), signal.SIGSTOP)  # resumes only on SIGCONT
        if self.stall:
            await asyncio.sleep(self.stall)

    def before_return(self) -> None:
        """With the chunk written and the return about to leave: stop this process, once, if asked."""
        if self.stop_before_return:
            self.stop_before_return = False  # once: the retry should go through
            os.kill(os.getpid(), signal.SIGSTOP)  # resumes only on SIGCONT

    def around(self, device_cls: Any) -> Any:
        """``device_cls``, or a :class:`FaultyStaging` around it when a drill changes the writes."""
        return FaultyStaging(device_cls, self) if self.writes else device_cls


@dataclass
class _Carried:
    """What a holder's drills carry from one hop to the next."""

    handle: BufferHandle | str | None = None
    staging: bytes | None = None


@dataclass
class FaultyStaging:
    """A holder's device class with its drills around the staging writes; the rest is the class's own."""

    device_cls: Any
    faults: HolderFaults
    carried: _Carried = field(default_factory=_Carried)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.device_cls, name)

    def map_staging(self, handle: BufferHandle | str) -> FaultyMapping:
        """Map this hop's staging (trying an earlier hop's first, if asked: that must fail)."""
        if self.faults.map_old and self.carried.handle is not None:
            # An earlier hop's buffer must be gone: this raises DeviceError
            # (on cupy when the mapping is first used: IPC handles open lazily).
            self.device_cls.map_staging(self.carried.handle).read_back(1)
        mapping = self.device_cls.map_staging(handle)
        self.carried.handle = handle
        return FaultyMapping(mapping, self.faults, self.carried)

    def unmap(self, mapping: FaultyMapping) -> None:
        """Drop the mapping underneath."""
        self.device_cls.unmap(mapping.inner)


@dataclass
class FaultyMapping:
    """A staging mapping whose ``seal_into`` writes what the drill says."""

    inner: StagingWriter
    faults: HolderFaults
    carried: _Carried

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def seal_into(self, plaintext: memoryview, params: ChannelParams, ctx: SegmentContext) -> SealSummary:
        """Seal the chunk, or write garbage, a replay or half a chunk instead; then dump or keep what was written."""
        f, m = self.faults, self.inner
        total = staging_size(len(plaintext), params.segment_size)
        forged = SealSummary(ctx.count, len(plaintext), b"\0" * 32)
        if f.exit_mid_provision:
            m.write_ciphertext(0, os.urandom(len(plaintext) // 2))
            os.kill(os.getpid(), signal.SIGKILL)
        if f.garbage:
            m.write_ciphertext(0, os.urandom(total))
            summary = forged
        elif f.replay_previous and self.carried.staging is not None:
            m.write_ciphertext(0, self.carried.staging[:total])
            summary = forged
        elif f.replay_from:
            try:
                with open(f.replay_from, "rb") as fh:
                    old = fh.read(total)
            except OSError as exc:
                raise GtbusError(f"replay_from: {exc}") from None
            m.write_ciphertext(0, old)
            summary = forged
        else:
            summary = m.seal_into(plaintext, params, ctx)
        if f.replay_previous:
            self.carried.staging = m.read_back(total)
        if f.dump_to:
            tmp = f.dump_to + ".tmp"
            with open(tmp, "wb") as fh:
                fh.write(m.read_back(total))
            os.replace(tmp, f.dump_to)
        return summary
