"""`gtbus sample` and the demo's samples: deterministic, printable, and the trained model writes text the untrained one does not."""

from __future__ import annotations

import json

import numpy
import pytest

from export_kit import DEMO_ARGS, DemoRun, gtbus, gtbus_here, one_error_line
from gtbus.errors import ConfigError
from gtbus.export import load_export
from gtbus.export.sample import MAX_SAMPLE_BYTES, generate, next_byte_logits, render
from gtbus.training.bytelm import ByteLM

pytestmark = pytest.mark.slow


def printable_share(data: bytes) -> float:
    return sum(1 for b in data if 0x20 <= b < 0x7F or b == 0x0A) / len(data)


def test_the_trained_model_writes_text_the_untrained_one_does_not(demo_run: DemoRun) -> None:
    loaded = load_export(demo_run.run_dir / "export")
    trained = generate(loaded.trainer, b"import ", 200, seed=1)
    untrained = generate(loaded.untrained(), b"import ", 200, seed=1)
    # the corpus is Python source: printable ASCII and newlines; an untrained ByteLM is near uniform over 256 bytes
    assert printable_share(trained) > 0.95 > 0.6 > printable_share(untrained)
    assert trained.count(b" ") > 10


def test_the_demo_printed_both_samples(demo_run: DemoRun) -> None:
    lines = {line[:20].strip(): line[20:] for line in demo_run.stdout.splitlines()}
    assert lines["exported model"].startswith(str(demo_run.run_dir / "export"))
    loaded = load_export(demo_run.run_dir / "export")
    # what it printed is what the exported model and the initial model write for the demo's prompt and seed
    assert lines["sample, trained"] == render(b"    def " + generate(loaded.trainer, b"    def ", 72, seed=0), one_line=True)
    assert lines["sample, untrained"] == render(b"    def " + generate(loaded.untrained(), b"    def ", 72, seed=0), one_line=True)
    assert all(0x20 <= ord(c) < 0x7F for c in lines["sample, untrained"])  # escaped: one printable line


def test_sampling_is_deterministic_and_follows_its_settings(demo_run: DemoRun) -> None:
    trainer = load_export(demo_run.run_dir / "export").trainer
    assert generate(trainer, b"def ", 40, seed=7) == generate(trainer, b"def ", 40, seed=7)
    assert generate(trainer, b"def ", 40, seed=7) != generate(trainer, b"def ", 40, seed=8)
    greedy = generate(trainer, b"class ", 10, temperature=0.0, seed=1)
    assert greedy == generate(trainer, b"class ", 10, temperature=0.0, seed=2)  # no randomness at 0
    assert greedy[0] == int(numpy.argmax(next_byte_logits(trainer, b"class ")))
    assert isinstance(trainer, ByteLM)
    # a prompt longer than the window: only its last `context` bytes count
    assert numpy.array_equal(next_byte_logits(trainer, b"x" * 100 + b"def f(self):"), next_byte_logits(trainer, b"x" * 4 + b"def f(self):"))


@pytest.mark.parametrize(("n", "temperature", "expected"), [
    (0, 1.0, r"bytes to generate must be 1\.\."),
    (MAX_SAMPLE_BYTES + 1, 1.0, r"bytes to generate must be 1\.\."),
    (5, -0.1, r"temperature must be 0\.\.100"),
    (5, float("nan"), r"temperature must be 0\.\.100"),
    (5, 1e9, r"temperature must be 0\.\.100"),
])
def test_bad_settings_are_one_line(demo_run: DemoRun, n: int, temperature: float, expected: str) -> None:
    trainer = load_export(demo_run.run_dir / "export").trainer
    with pytest.raises(ConfigError, match=expected):
        generate(trainer, b"x", n, temperature=temperature)


def test_render_escapes_what_a_terminal_would_act_on() -> None:
    assert render(b"a\x1b[2Jb\n\tc\x00\xff") == "a\\x1b[2Jb\n\tc\\x00\\xff"
    assert render(b"a\nb\tc", one_line=True) == "a\\nb\\tc"


def test_the_cli_samples_an_export(demo_run: DemoRun) -> None:
    out = demo_run.run_dir / "export"
    args = ("sample", out, "--prompt", "def __init__(self", "--bytes", "60", "--seed", "3", "--temperature", "0.5")
    first, second = gtbus(*args), gtbus_here(*args)  # the real command, and again in this process: the same text
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("def __init__(self")
    assert len(first.stdout.rstrip("\n")) >= len("def __init__(self") + 60


@pytest.mark.parametrize(("args", "expected"), [
    (("--bytes", "0"), "Invalid value for '--bytes'"),
    (("--temperature", "-1"), "Invalid value for '--temperature'"),
    (("--seed", "x"), "Invalid value for '--seed'"),
])
def test_bad_cli_options_are_one_line(demo_run: DemoRun, args: tuple[str, ...], expected: str) -> None:
    assert expected in one_error_line(gtbus_here("sample", demo_run.run_dir / "export", *args))


def test_a_folder_that_is_not_an_export_is_one_line(demo_run: DemoRun) -> None:
    assert "not a gtbus export (no config.json)" in one_error_line(gtbus_here("sample", demo_run.run_dir))
    assert "not a gtbus export (no config.json)" in one_error_line(gtbus_here("sample", demo_run.run_dir / "nowhere"))


def test_demo_json_stays_one_json_document_on_stdout(tmp_path) -> None:
    p = gtbus("demo", "--run-dir", tmp_path / "run", *DEMO_ARGS[:-2], "--holders", "1", "--steps", "5", "--json", timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout)
    assert summary["hops_trained"] >= 1
    assert "sample, trained" in p.stderr and "sample, untrained" in p.stderr
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
