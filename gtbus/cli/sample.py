"""``gtbus sample DIR --prompt TEXT``: text from an exported model."""

from __future__ import annotations

from pathlib import Path

import click

from gtbus.export.sample import DEFAULT_TEMPERATURE, MAX_SAMPLE_BYTES, MAX_TEMPERATURE


@click.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--prompt", default="", help="Text the model continues (UTF-8).")
@click.option("--bytes", "n_bytes", type=click.IntRange(1, MAX_SAMPLE_BYTES), default=120, show_default=True, help="Bytes to generate.")
@click.option("--temperature", type=click.FloatRange(0.0, MAX_TEMPERATURE), default=DEFAULT_TEMPERATURE, show_default=True, help="0: always the most likely byte.")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed gives the same text.")
def sample(export_dir: Path, prompt: str, n_bytes: int, temperature: float, seed: int) -> None:
    """Generate bytes from the model `gtbus export` wrote into EXPORT_DIR (ByteLM, or GPT-2 on byte tokens)."""
    from gtbus.export.model_files import load_export
    from gtbus.export.sample import generate, render

    loaded = load_export(export_dir)
    text = generate(loaded.trainer, prompt.encode("utf-8", "surrogateescape"), n_bytes, temperature=temperature, seed=seed)
    click.echo(render(prompt.encode("utf-8", "surrogateescape")) + render(text))
