"""The orchestrator's failure injection: faults named on the command line, applied at one point of a hop.

For drills and tests only (the hidden ``--fault`` option). A fault is a hook
the orchestrator calls once per hop, after the holder's return and before the
model and code are measured again; the hop's own code is not changed by it.
Specs (``-`` or ``_`` alike):

* ``tamper-model-at-epoch=N``: flip one bit of the first parameter during hop N;
* ``tamper-code-at-epoch=N``: swap the code of one trainer method (``evaluate``)
  during hop N.

Either way hop N must be rolled back (and after a code change, the run stops).
A spec that is not one of these is a one-line :class:`~gtbus.errors.ConfigError`.
"""

from __future__ import annotations

from typing import Any, Callable, Final

from gtbus.errors import ConfigError

FAULT_KINDS: Final = ("tamper-model-at-epoch", "tamper-code-at-epoch")

#: What the orchestrator calls during each hop: (the orchestrator, the hop's assignment).
TamperHook = Callable[[Any, Any], None]


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

    def tamper(orch: Any, assignment: Any) -> None:
        if orch.token.epoch != at:
            return
        if kind == "tamper-model-at-epoch":
            flat = orch.trainer.parameter_views()[0].reshape(-1).view("uint8")
            flat[0] ^= 1
        else:
            fn = type(orch.trainer).evaluate
            fn.__code__ = fn.__code__.replace(co_consts=fn.__code__.co_consts + ("tampered",))

    return tamper
