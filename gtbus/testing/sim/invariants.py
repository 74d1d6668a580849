"""What must hold in every simulated run, checked as it happens and after every step.

Each invariant has a name (the ``Violation.name`` a failing seed prints), and
each is shown able to fire by a test that drives a deliberately broken
machine (``tests/sim/test_invariants_fire.py``):

* ``epoch-reused``: no token epoch is granted twice, across restarts too;
* ``two-owners``: at most one holder can write live staging of a granted hop
  (it mapped an export that is still exported, and the hop's key is live),
  and a staging prepared ahead of its grant (``token.prepare``) is mapped by no
  one but the holder it was prepared for;
* ``prepared-granted-elsewhere``: a staging prepared for one holder is granted
  to that holder or to no one (the holder may have mapped it and may still
  write to it);
* ``chunk-trained-twice``: a chunk is trained at most once per round, along the
  model's own history (a restart from a checkpoint rewinds that history);
* ``trained-unauthenticated``: every segment trained was written by the granted
  holder, under that hop's key and epoch, and carries that holder's data;
* ``unscrubbed-before-grant``: before any grant, every earlier staging buffer is
  scrubbed and released and every earlier hop key dropped;
* ``model-changed-without-training``: the model is trained only from a digest
  reached by training on accepted chunks (or restored from one), and is such a
  digest whenever a hop starts or a checkpoint is saved;
* ``no-progress``: once faults stop, the run finishes or stops with a named
  reason within a bounded simulated time;
* ``dataset-changed``: once a run is scheduled, a holder is admitted only with
  the dataset (token count, digest) it was scheduled with, after a resume too.

A fleet (``gtbus sim --gpus K``) has one device per lane: the checks above hold
per device (one owner, everything earlier scrubbed, each replica's model
accounted for), and across them:

* ``epoch-reused`` is across lanes: no two grants of any lanes share an epoch;
* ``epoch-not-increasing``: each token's (lane's) epochs strictly increase;
* ``holder-on-two-gpus``: a holder is granted on one lane while it still holds
  live staging (exported or not, its key live) on another;
* ``chunk-trained-twice`` is across replicas: a merge (model averaging) joins
  the replicas' histories, and no chunk may appear twice in one round of the
  joined history, nor twice in the final model's;
* ``wave-overlap`` (a lockstep fleet, ``--lockstep``): a hop starts only in the
  same dispatch pass as every hop in flight (its wave), never beside a hop of an
  earlier wave.

The checker learns of the device's operations through :class:`DeviceWatch`;
it keeps only what it needs, so checking costs little per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Iterator, Sequence

from gtbus.testing.sim.device import INITIAL_MODEL, Opened, SimDevice, Staging, chunk_tag

EPOCH_REUSED: Final = "epoch-reused"
TWO_OWNERS: Final = "two-owners"
CHUNK_TWICE: Final = "chunk-trained-twice"
UNAUTHENTICATED: Final = "trained-unauthenticated"
UNSCRUBBED: Final = "unscrubbed-before-grant"
MODEL_UNACCOUNTED: Final = "model-changed-without-training"
NO_PROGRESS: Final = "no-progress"
DATASET_CHANGED: Final = "dataset-changed"
EPOCH_ORDER: Final = "epoch-not-increasing"
HOLDER_TWO_GPUS: Final = "holder-on-two-gpus"
PREPARED_ELSEWHERE: Final = "prepared-granted-elsewhere"
WAVE_OVERLAP: Final = "wave-overlap"

#: Every invariant's name, in the order the module docstring gives them.
INVARIANTS: Final = (EPOCH_REUSED, TWO_OWNERS, CHUNK_TWICE, UNAUTHENTICATED, UNSCRUBBED, MODEL_UNACCOUNTED, NO_PROGRESS, DATASET_CHANGED,
                     EPOCH_ORDER, HOLDER_TWO_GPUS, PREPARED_ELSEWHERE, WAVE_OVERLAP)


@dataclass(frozen=True)
class Violation:
    """An invariant that failed: which, when (simulated seconds), and what was seen."""

    name: str
    at: float
    detail: str

    def __str__(self) -> str:
        return f"{self.name} at t={self.at:.4f}: {self.detail}"


class InvariantChecker:
    """Watches the device and the run; collects violations (the first one stops the run)."""

    def __init__(self) -> None:
        self.violations: list[Violation] = []
        self.now = 0.0
        self.epochs: set[int] = set()
        # The model's history: digest -> (the digest it was trained from, (round, holder, chunk)).
        self.lineage: dict[int, tuple[int, tuple[int, str, int]] | None] = {INITIAL_MODEL: None}
        self.merges: dict[int, tuple[int, ...]] = {}  # a merged model -> the replicas it averaged
        self.trained_hops = 0
        self.datasets: dict[str, tuple[int, str]] = {}
        self.devices: list[SimDevice] = []  # every lane's device (a fleet); a lone device need not be listed
        self.last_epoch: dict[str, int] = {}  # token id -> its last granted epoch

    def fail(self, name: str, detail: str) -> None:
        """Record a violation."""
        self.violations.append(Violation(name, self.now, detail))

    # -- DeviceWatch ----------------------------------------------------------------------------

    def staged(self, device: SimDevice, staging: Staging) -> None:
        """A grant is about to leave with this staging: fresh epoch, everything earlier scrubbed."""
        if staging.granted_to and staging.granted_to != staging.holder:
            self.fail(PREPARED_ELSEWHERE, f"staging prepared for {staging.holder} granted to {staging.granted_to} (epoch {staging.epoch})")
        if staging.epoch in self.epochs:
            self.fail(EPOCH_REUSED, f"epoch {staging.epoch} granted again (to {staging.holder})")
        elif staging.epoch <= self.last_epoch.get(staging.token, 0):
            self.fail(EPOCH_ORDER, f"token {staging.token} granted epoch {staging.epoch} after epoch {self.last_epoch[staging.token]}")
        self.epochs.add(staging.epoch)
        self.last_epoch[staging.token] = max(staging.epoch, self.last_epoch.get(staging.token, 0))
        for lane, gpu in enumerate(self.devices):
            held = [s for s in gpu.stagings.values() if gpu is not device and s.holder == staging.holder and s.key in gpu.keys]
            if held:
                self.fail(HOLDER_TWO_GPUS, f"{staging.holder} granted epoch {staging.epoch} while it holds lane {lane}'s staging of epoch {held[0].epoch}")
                break
        for other in device.stagings.values():
            if other is not staging and not (other.scrubbed and other.released):
                self.fail(UNSCRUBBED, f"grant of epoch {staging.epoch} while staging of epoch {other.epoch} is not scrubbed and released")
                break
        # A staging released without a scrub is gone from device.stagings: it is kept apart.
        if device.released_unscrubbed:
            s = device.released_unscrubbed[0]
            self.fail(UNSCRUBBED, f"grant of epoch {staging.epoch} after staging of epoch {s.epoch} was released without a scrub")
        stale = device.keys - {staging.key}
        if stale:
            self.fail(UNSCRUBBED, f"grant of epoch {staging.epoch} while {len(stale)} earlier hop key(s) are still live")
        if device.model is not None and not self.accounted(device.model):
            self.fail(MODEL_UNACCOUNTED, f"hop of epoch {staging.epoch} starts from a model no training produced")

    def trained(self, device: SimDevice, opened: Opened, key: tuple[int, str, int], before: int) -> None:
        """Training happened: authenticated, once per round, from an accounted model."""
        s = opened.staging
        rnd, holder, chunk = key
        for seg in opened.segments:
            if seg.writer != s.holder or seg.key != s.key or seg.epoch != s.epoch or seg.holder != s.holder:
                self.fail(UNAUTHENTICATED, f"epoch {s.epoch}: trained segment {seg.index} written by {seg.writer} (granted {s.holder})")
                break
            if seg.content != chunk_tag(s.holder, chunk):
                self.fail(UNAUTHENTICATED, f"epoch {s.epoch}: trained segment {seg.index} is not {s.holder}'s chunk {chunk}")
                break
        if not self.accounted(before):
            self.fail(MODEL_UNACCOUNTED, f"epoch {s.epoch}: trained from a model no training produced")
        elif any(done == key for done in self._history(before, rnd)):
            self.fail(CHUNK_TWICE, f"{holder} chunk {chunk} trained twice in round {rnd} (epoch {s.epoch})")
        after = device.model
        assert after is not None
        # The same chunk trained from the same model gives the same model (a training lost
        # in a crash, redone in a later round): the latest training is the model's history.
        self.lineage[after] = (before, key)
        self.trained_hops += 1

    def wave_started(self, lane: int, wave: int, in_flight: Sequence[int]) -> None:
        """A lockstep fleet's ``lane`` starts a hop in dispatch pass ``wave``; ``in_flight``: the passes of the hops in flight."""
        earlier = sorted(set(w for w in in_flight if w != wave))
        if earlier:
            self.fail(WAVE_OVERLAP, f"lane {lane} started a hop in wave {wave} while hops of wave {earlier[0]} were in flight")

    def restored(self, device: SimDevice, model: int) -> None:
        """A checkpoint's model was loaded: it must be one training produced."""
        if not self.accounted(model):
            self.fail(MODEL_UNACCOUNTED, "restored a model no training produced")

    # -- the model's history ----------------------------------------------------------------------

    def accounted(self, model: int) -> bool:
        """Whether training (or a merge of trained replicas) produced ``model``."""
        return model in self.lineage or model in self.merges

    def _history(self, model: int, rnd: int | None = None) -> Iterator[tuple[int, str, int]]:
        """The trainings ``model`` descends from, each training once, through merges (only round ``rnd``'s, when given)."""
        seen: set[int] = set()
        todo = [model]
        while todo:
            d = todo.pop()
            if d in seen:
                continue
            seen.add(d)
            if d in self.merges:
                todo.extend(self.merges[d])
                continue
            entry = self.lineage.get(d)
            if entry is None:
                continue
            before, done = entry
            if rnd is not None and done[0] != rnd:
                continue  # rounds are barriers: what came before is another round's
            yield done
            todo.append(before)

    def merged(self, replicas: Sequence[int], model: int) -> None:
        """The replicas were averaged into ``model``: each accounted for, and no chunk twice in their joined history."""
        for r in replicas:
            if not self.accounted(r):
                self.fail(MODEL_UNACCOUNTED, "merged a replica no training produced")
                return
        if model not in replicas:
            self.merges[model] = tuple(sorted(set(replicas)))
        seen: set[tuple[int, str, int]] = set()
        for done in self._history(model):
            if done in seen:
                self.fail(CHUNK_TWICE, f"{done[1]} chunk {done[2]} of round {done[0]} trained on two replicas, merged")
                return
            seen.add(done)

    # -- after every step -----------------------------------------------------------------------

    def check_step(self, device: SimDevice) -> None:
        """The per-step checks: one owner."""
        for d in self.devices or (device,):
            owners: set[str] = set()
            for s in d.stagings.values():
                if not (s.exported and s.mappers and s.key in d.keys):
                    continue
                if s.granted:
                    owners |= s.mappers
                elif s.mappers - {s.holder}:
                    self.fail(TWO_OWNERS, f"{', '.join(sorted(s.mappers - {s.holder}))} mapped staging prepared for {s.holder}")
                    return
            if len(owners) > 1:
                self.fail(TWO_OWNERS, f"{', '.join(sorted(owners))} hold live staging at once")
                return

    def scheduled(self, datasets: dict[str, tuple[int, str]]) -> None:
        """The run's schedule was built from these datasets (holder -> (tokens, digest))."""
        self.datasets = dict(datasets)

    def admitted(self, holder: str, total_tokens: int, digest: str) -> None:
        """A holder's manifest was admitted: once the run is scheduled, the dataset it was scheduled with, restarts included."""
        first = self.datasets.get(holder)
        if first is not None and first != (total_tokens, digest):
            self.fail(DATASET_CHANGED, f"{holder} admitted with {total_tokens} tokens, digest ...{digest[-8:]}; the run was scheduled with {first[0]} tokens, digest ...{first[1][-8:]}")

    def checkpointed(self, model: int | None) -> None:
        """A checkpoint is being saved with this model."""
        if model is not None and not self.accounted(model):
            self.fail(MODEL_UNACCOUNTED, "checkpoint saved a model no training produced")

    def check_end(self, finished: bool, stopped: str | None, waited: float) -> None:
        """Liveness: faults stopped ``waited`` simulated seconds ago; the run must have ended."""
        if not finished and not stopped:
            self.fail(NO_PROGRESS, f"neither finished nor stopped with a reason {waited:.1f}s after faults stopped")

    def check_final_model(self, model: int | None, expected: set[tuple[int, str, int]]) -> None:
        """A finished run's model is the chain of exactly the chunks its schedule trained, each once."""
        if model is not None and model != INITIAL_MODEL and not self.accounted(model):
            self.fail(MODEL_UNACCOUNTED, "the final model is not a chain of trainings")
            return
        got = list(self._history(model)) if model is not None else []
        if len(got) != len(set(got)) or set(got) != expected:
            lost = sorted(expected - set(got))[:3]
            extra = sorted(set(got) - expected)[:3]
            self.fail(MODEL_UNACCOUNTED, f"the final model is not the run's trainings (missing {lost}, unexpected {extra})")

