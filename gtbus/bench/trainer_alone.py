"""The trainer alone: tokens per second of a workload with no protocol around it, in its own process.

The baseline of ``gtbus bench travel``'s "training inside the loop" goal. It
trains the workload the orchestrator trains (``make_trainer(name)``, the same
minibatch shape) on the tokens of a holder's shard put on the device once,
for ``warmup`` steps that are not counted (kernel selection, allocator
growth, the first autocast casts), then for ``steps`` timed ones. The timing
is synchronised: ``train_on`` reads its last loss back from the device
before it returns, so its ``seconds`` cover the queued work.

Run as ``python -m gtbus.bench.trainer_alone --trainer gpt2 --backend cupy
--shard FILE --tokens N --steps S --warmup W``; it prints one JSON object.
Its own process, like the orchestrator's: the load time it reports (torch
import, model build, device context) is what every deployment also pays at
start.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import numpy


def measure_trainer_alone(trainer_name: str, backend: str, shard: Path, tokens: int, steps: int, warmup: int) -> dict[str, Any]:
    """Load the workload on ``backend``, train ``warmup`` then ``steps`` steps on the first ``tokens`` of ``shard``; the numbers."""
    t0 = time.perf_counter()
    from gtbus.gpu.backends import make_device
    from gtbus.training.shards import read_shard
    from gtbus.training.workloads import make_trainer

    device = make_device(backend)
    xp = device.array_module
    trainer = make_trainer(trainer_name)
    trainer.load(xp)
    t1 = time.perf_counter()
    host = numpy.ascontiguousarray(read_shard(shard)[:tokens])
    buffer = xp.asarray(host)
    warm = trainer.train_on(buffer, warmup) if warmup else None
    report = trainer.train_on(buffer, steps)
    return {
        "trainer": trainer_name,
        "backend": backend,
        "device": device.device_id,
        "tokens_in_buffer": int(host.shape[0]),
        "load_s": t1 - t0,
        "warmup_steps": warmup,
        "warmup_s": warm.seconds if warm else 0.0,
        "steps": report.steps,
        "seconds": report.seconds,
        "tokens_per_step": report.tokens_seen // report.steps,
        "tokens_per_s": report.tokens_seen / report.seconds,
        "loss_first": report.loss_first,
        "loss_last": report.loss_last,
    }


@click.command()
@click.option("--trainer", "trainer_name", default="bytelm", show_default=True)
@click.option("--backend", type=click.Choice(["host", "cupy"]), default="host", show_default=True)
@click.option("--shard", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True, help="An llm.c shard (what `gtbus data build` writes).")
@click.option("--tokens", type=click.IntRange(min=2), default=1 << 24, show_default=True, help="Train on the shard's first N tokens (one device buffer).")
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True, help="Timed steps.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Steps before the timed ones, not counted.")
def main(trainer_name: str, backend: str, shard: Path, tokens: int, steps: int, warmup: int) -> None:
    """Print the trainer-alone measurement as one JSON object."""
    click.echo(json.dumps(measure_trainer_alone(trainer_name, backend, shard, tokens, steps, warmup)))


if __name__ == "__main__":
    main()
