"""Hostile holders (the classes of issue [1 of 7]): a valid key, a chosen misbehaviour.

Each behaviour is a way a holder with a valid key may lie. The run must go
on, and nothing it wrote wrongly may be trained: the invariants say so after
every step. :data:`BEHAVIOURS` names them (``gtbus sim`` draws from it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Final

from gtbus.messages.types import ShipSegment, TokenAck, TokenDecline, TokenReturn
from gtbus.testing.sim.device import Segment, chunk_tag
from gtbus.testing.sim.holder import SimHolder
from gtbus.testing.sim.orchestrator import GrantBody
from gtbus.testing.sim.world import Envelope

_HUGE: Final = 1 << 63

#: behaviour -> what the holder does.
BEHAVIOURS: Final = {
    "garbage": "writes random bytes instead of ciphertext",
    "replay-other": "writes ciphertext another holder wrote in an earlier hop",
    "wrong-values": "returns huge, negative or wrong-typed counts, or a body with a field missing or extra",
    "other-epoch": "sends acks, returns and declines for other epochs and tokens before its own return",
    "write-after-return": "keeps writing its staging after the return",
    "truncate": "drops its last segment from staging and claims them all",
    "squat": "acks, returns and declines for hops granted to others, and maps old staging handles",
    "stall": "acks and never returns",
    "decline-junk": "declines every grant with a reason full of escapes",
    "bad-manifest": "registers a misfit manifest, then changes its dataset mid-run",
    "duplicate-return": "sends its return three times",
    "bad-segments": "segments (shipped, or streamed to the agent) with indices, counts and sizes out of range, duplicated, or mistyped",
    "wrong-role": "sends what only the orchestrator or the agent may: revokes and grants to other holders, agent answers",
    "prepare-early": "writes the staging prepared for it before its grant (garbage, or its chunk under a guessed epoch), then returns the grant without writing",
}


class HostileHolder(SimHolder):
    """A holder that does one thing of :data:`BEHAVIOURS` (on about two hops in three)."""

    behaviour: str = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._old_handles: list[int] = []
        self._welcomed_before = False
        self._written_early: int | None = None  # the prepared staging it wrote before its grant

    def _now_hostile(self) -> bool:
        return self.world.rng.random() < 0.67

    def manifest(self) -> dict[str, Any]:
        m = super().manifest()
        if self.behaviour == "bad-manifest":
            pick = self.world.rng.randrange(4)
            if pick == 0:
                m["total_tokens"] = _HUGE
            elif pick == 1:
                m["token_dtype"] = "int64"
            elif pick == 2 and self._welcomed_before:
                _change_data(m)  # other data once the run has it scheduled (e.g. after the orchestrator restarted)
            else:
                m["max_token"] = -1
            if self.world.rng.random() < 0.5:
                self.world.on_node(self.name, 0.01, self._honest_register, self.incarnation)
        return m

    def _honest_register(self, inc: int) -> None:
        if self._live(inc):
            self.send("register", SimHolder.manifest(self))

    def receive(self, env: Envelope) -> None:
        if env.kind == "grant" and self.up:
            g: GrantBody = env.body
            b = self.behaviour
            if b == "decline-junk" and g.holder == self.name:
                self.send("decline", TokenDecline(g.token_id, "\x1b[2J\r\nok\x00" * 8), env.epoch)
                return
            if b == "squat" and g.holder == self.name:
                self._squat(g, env.epoch)
            if b == "wrong-role" and g.holder == self.name:
                self._wrong_role(g, env.epoch)
            if b == "other-epoch" and g.holder == self.name and self._now_hostile():
                self._other_epochs(g, env.epoch)
        if env.kind == "welcome":
            self._welcomed_before = True
        if env.kind == "welcome" and self.behaviour == "bad-manifest" and self.world.rng.random() < 0.3:
            self.world.on_node(self.name, 0.05, self._register_changed, self.incarnation)
        super().receive(env)

    def _register_changed(self, inc: int) -> None:
        if self._live(inc):
            m = SimHolder.manifest(self)
            _change_data(m)
            self.send("register", m)

    def _squat(self, g: GrantBody, epoch: int) -> None:
        # Its own grant told it the token id and the epoch: it claims the next few hops.
        for e in (epoch + 1, epoch + 2):
            self.world.on_node(self.name, 0.003, self.send, "return", TokenReturn(g.token_id, 0, 1, 2, b"", bytes(32)), e)
            self.world.on_node(self.name, 0.004, self.send, "ack", TokenAck(g.token_id), e)
            self.world.on_node(self.name, 0.005, self.send, "decline", TokenDecline(g.token_id, "mine"), e)
        for old in self._old_handles:
            if self.device.map(old, self.name) is not None:  # must never succeed
                self.device.write(old, Segment(0, epoch, self.name, 0, 1, 0, self.name), self.name)
        self._old_handles.append(g.staging)

    def _wrong_role(self, g: GrantBody, epoch: int) -> None:
        w = self.world
        for other in self.cfg.holders:
            if other != self.name:
                w.send(self.name, other, "revoke", g.token_id, epoch + 1)
                w.send(self.name, other, "grant", replace(g, holder=other), epoch + 1)
                w.send(self.name, other, "agent-written", g.token_id, epoch + 1)
        self.send("agent-ready", g.token_id, epoch + 1)
        self.send("welcome", 0)

    def _other_epochs(self, g: GrantBody, epoch: int) -> None:
        ret = TokenReturn(g.token_id, g.chunk_index, *self.chunk_shape(g.chunk_index), b"", bytes(32))
        self.send("return", ret, epoch - 1)
        self.send("return", ret, epoch + 1)
        self.send("return", TokenReturn("t-forged", g.chunk_index, ret.segments, ret.nbytes, b"", bytes(32)), epoch)
        self.send("decline", TokenDecline(g.token_id, "old"), epoch - 1)
        self.send("ack", TokenAck("t-forged"), epoch)

    def _segments(self, g: GrantBody, epoch: int) -> list[Segment]:
        segs = super()._segments(g, epoch)
        b = self.behaviour
        if b == "garbage" and self._now_hostile():
            i = self.world.rng.randrange(len(segs))
            segs[i] = Segment(self.world.rng.getrandbits(32), epoch, self.name, i, len(segs), 0, self.name)
        elif b == "replay-other" and self._now_hostile():
            captured = [s for s in self.device.captured if s.writer != self.name]
            if captured:
                old = self.world.rng.choice(captured)
                i = min(old.index, len(segs) - 1)
                segs[i] = old
        return segs

    def _prepared_hook(self, body: tuple[str, int, int, int]) -> None:
        if self.behaviour != "prepare-early" or not self._now_hostile():
            return
        _, chunk, key, sid = body
        n, _ = self.chunk_shape(chunk)
        rng = self.world.rng
        epoch = rng.choice((0, rng.randrange(1, 40)))  # it cannot know the hop's epoch: it guesses
        # Its chunk sealed under the hop's key, or garbage (bytes under no key: other content under the
        # right key would be a holder lying about its own data, which no channel can tell from the truth).
        garbage = rng.random() < 0.5
        for i in range(n):
            seg = Segment(rng.getrandbits(32), epoch, self.name, i, n, 0, self.name) if garbage else \
                Segment(key, epoch, self.name, i, n, chunk_tag(self.name, chunk), self.name)
            self.device.write(sid, seg, self.name)
        self._written_early = sid

    def _write(self, inc: int, g: GrantBody, epoch: int) -> None:
        if self._written_early is not None and g.staging == self._written_early:
            self._written_early = None
            if self._live(inc) and self.machine.is_current(g.token_id, epoch):
                self.world.on_node(self.name, 0.001, self._return, inc, g, epoch)  # what it wrote early is all there is
            return
        super()._write(inc, g, epoch)

    def _after_write(self, g: GrantBody, epoch: int) -> None:
        b = self.behaviour
        if b == "truncate" and self._now_hostile():
            n, _ = self.chunk_shape(g.chunk_index)
            self.device.map(g.staging, self.name)
            self.device.truncate(g.staging, self.name, n - 1)
            self.device.unmap(g.staging, self.name)
        elif b == "write-after-return" and self._now_hostile():
            for dt in (0.0005, 0.002, 0.01, 0.5):
                self.world.on_node(self.name, dt, self._scribble, g, epoch)

    def _scribble(self, g: GrantBody, epoch: int) -> None:
        if self.device.map(g.staging, self.name) is not None:
            self.device.write(g.staging, Segment(0, epoch, self.name, 0, 1, 0, self.name), self.name)
            self.device.unmap(g.staging, self.name)

    def _send_return(self, g: GrantBody, epoch: int, ret: TokenReturn) -> None:
        b = self.behaviour
        if b == "stall":
            if not self._now_hostile():
                super()._send_return(g, epoch, ret)
            return
        if b == "wrong-values" and self._now_hostile():
            body: dict[str, Any] = {"token_id": g.token_id, "chunk_index": ret.chunk_index, "segments": ret.segments,
                                    "nbytes": ret.nbytes, "ciphertext_digest": b"", "chunk_commitment": bytes(32)}
            pick = self.world.rng.randrange(7)
            if pick == 0:
                body["segments"] = _HUGE
            elif pick == 1:
                body["nbytes"] = -1
            elif pick == 2:
                body["chunk_index"] = "0"
            elif pick == 3:
                del body["nbytes"]
            elif pick == 4:
                body["extra"] = 1
            elif pick == 5:
                body["chunk_index"] = ret.chunk_index + 1
            else:
                body["segments"] = 1.5
            self.send("return", body, epoch)
            return
        super()._send_return(g, epoch, ret)
        if b == "duplicate-return":
            self.send("return", ret, epoch)
            self.world.on_node(self.name, 0.003, self.send, "return", ret, epoch)


    def _shipped(self, g: GrantBody, epoch: int, segs: list[Segment]) -> list[Any]:
        bodies = super()._shipped(g, epoch, segs)
        if self.behaviour != "bad-segments" or not self._now_hostile():
            return bodies
        rng, n = self.world.rng, len(segs)
        i = rng.randrange(n)
        pick = rng.randrange(5)
        if pick == 0:
            bodies[i] = ShipSegment(g.token_id, n + rng.choice((0, 1, _HUGE)), n)
        elif pick == 1:
            bodies[i] = ShipSegment(g.token_id, -1, n)
        elif pick == 2:
            bodies[i] = ShipSegment(g.token_id, i, n + 1)
        elif pick == 3:
            bodies[i] = {"token_id": g.token_id, "index": str(i), "count": n}
        else:
            bodies[i] = ShipSegment(g.token_id, (i + 1) % n, n)  # a duplicate index; one is missing
        return bodies

    def _to_agent(self, g: GrantBody, epoch: int, segs: list[Segment]) -> list[tuple[Any, ...]]:
        bodies = super()._to_agent(g, epoch, segs)
        if self.behaviour != "bad-segments" or not self._now_hostile():
            return bodies
        rng, n = self.world.rng, len(segs)
        i = rng.randrange(n)
        token, _, _, seg, size = bodies[i]
        bodies[i] = rng.choice([(token, n, n, seg, size), (token, -1, n, seg, size), (token, i, n + 1, seg, size), (token, "0", n, seg, size),
                                (token, (i + 1) % n, n, seg, size), ("t-other", i, n, seg, size), (token, i, n, "not a segment", size),
                                (token, i, n, seg, size + 1), (token, i, n, seg, 1 << 40), (token, i, n, seg, "x")])
        return bodies

    def _shipped_size(self, g: GrantBody, index: int) -> int:
        size = super()._shipped_size(g, index)
        if self.behaviour == "bad-segments" and self.world.rng.random() < 0.2:
            return self.world.rng.choice((0, size + 1, size - 1, 1 << 40))
        return size


def _change_data(m: dict[str, Any]) -> None:
    # Other data: one token more (the chunk count stays unless it crosses a chunk), another digest.
    m["total_tokens"] += 1
    m["digest"] = f"{int(m['digest'], 16) ^ 1:064x}"


def hostile_holder(behaviour: str) -> type[HostileHolder]:
    """A holder class doing ``behaviour`` (KeyError naming it if it is not one of :data:`BEHAVIOURS`)."""
    if behaviour not in BEHAVIOURS:
        raise KeyError(f"unknown hostile behaviour {behaviour!r}")
    return type(f"Hostile_{behaviour.replace('-', '_')}", (HostileHolder,), {"behaviour": behaviour})
