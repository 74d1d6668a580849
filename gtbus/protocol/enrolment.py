"""Who may join a run, and with what data: the orchestrator's side of Register / Welcome.

Rules:

* A device agent of the deployment is welcome whenever it registers; the run
  waits for every agent a remote holder writes through.
* Only a holder the run names may register (``not-a-holder`` otherwise, for an
  unknown key, another role, or a holder of the deployment this run does not use).
* Its manifest must be admitted (:func:`~gtbus.protocol.admission.admit`):
  refused with admission's code and one line naming the remedy.
* Once the run is scheduled, a holder that registers again (it reconnected, or
  the orchestrator resumed) must bring the same data: admission checks the
  dataset against the one admitted before, and the chunk count must be the one
  the schedule was built with (``manifest-changed``).
* ``via`` must name a device agent of the deployment (``bad-manifest``).
* The run can start (:attr:`Enrolment.complete`) when every holder it names is
  in, and every agent one of them writes through.

No I/O: the shell passes in who sent what, and sends the Welcome or Refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Mapping, Sequence

from gtbus.messages.identity import Role
from gtbus.protocol.admission import AdmittedManifest, ManifestRefused, RunShape, admit


@dataclass(frozen=True)
class Refused:
    """A registration refused: ``code`` for counters, ``reason`` for the peer."""

    code: str
    reason: str


@dataclass(frozen=True)
class Welcomed:
    """A registration accepted: a device agent (no manifest), or a holder with its admitted manifest."""

    manifest: AdmittedManifest | None = None


class Enrolment:
    """The holders and device agents of one run, as they register."""

    def __init__(self, holders: Sequence[str], *, known: Mapping[str, tuple[int, str]] | None = None) -> None:
        self.holders = list(holders)
        # (token count, digest) each holder's data had when a checkpoint was written: a resumed
        # run admits only the same data again, though its enrolment starts empty.
        self.known = dict(known or {})
        self.manifests: dict[str, AdmittedManifest] = {}
        self.via: dict[str, str] = {}  # remote holder -> the device agent it writes through
        self.agents: set[str] = set()

    def register(
        self, sender: str, role: Role | None, manifest: object, shape: RunShape, *, scheduled: Mapping[str, int] | None, agents: AbstractSet[str]
    ) -> Welcomed | Refused:
        """Decide a registration: ``role`` of the sender's key (None: unknown), ``scheduled`` the
        schedule's chunk counts once the run has one, ``agents`` the deployment's device agents."""
        if role is Role.AGENT:
            self.agents.add(sender)
            return Welcomed()
        if role is not Role.HOLDER or sender not in self.holders:
            return Refused("not-a-holder", f"{sender} is not a holder of this run")
        try:
            m = admit(manifest, shape, previous=self.manifests.get(sender) if scheduled is not None else None)
        except ManifestRefused as exc:
            return Refused(exc.code, str(exc))
        changed = scheduled is not None and scheduled.get(sender, m.chunk_count) != m.chunk_count
        if changed or self.known.get(sender, (m.total_tokens, m.digest)) != (m.total_tokens, m.digest):
            return Refused("manifest-changed", "other data than this run was scheduled with; start a new run for new data")
        if m.via is not None and m.via not in agents:
            return Refused("bad-manifest", "'via' is not a device agent of this deployment")
        if m.via is not None:
            self.via[sender] = m.via
        else:  # it writes locally now: no agent stages its hops any more
            self.via.pop(sender, None)
        self.manifests[sender] = m
        return Welcomed(m)

    @property
    def complete(self) -> bool:
        """Every holder is in, and every agent a remote holder writes through."""
        return all(h in self.manifests for h in self.holders) and set(self.via.values()) <= self.agents

    def missing(self) -> list[str]:
        """Who the run still waits for (holders, then agents), sorted."""
        return sorted(set(self.holders) - set(self.manifests)) + sorted(set(self.via.values()) - self.agents)
