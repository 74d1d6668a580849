"""A run's final model as files other tools load: safetensors, a JSON config, and llm.c's GPT-2 checkpoint.

``export_model(RUN, DIR)`` writes into ``DIR``:

* ``model.safetensors``: the parameters only (no optimizer moments), float32,
  named as :mod:`gtbus.export.layout` says (GPT-2: Hugging Face names and
  layout, with ``{"format": "pt"}`` metadata as ``transformers`` expects);
* ``config.json``: the trainer, its shape, the dtype, the gtbus version, the
  run id, the model digest, and how to rebuild the measured views from the
  tensors (``measurement``: the run's device backend and each view's layout);
  for GPT-2 also the Hugging Face GPT-2 config keys;
* for GPT-2, ``gpt2_llmc.bin``: the same weights as llm.c loads them
  (:mod:`gtbus.export.llmc`).

Rules:

* The model digest is the one the run's orchestrator measured on its device
  over these weights (:mod:`gtbus.export.digest`). The export recomputes it
  from the files it wrote and refuses to finish unless it equals the digest
  of the trainer's own ``parameter_views()``: the files are the model.
* An export writes only its own files: ``DIR`` may hold other files (the
  signed manifest beside it), and a file of ours that is there already is
  replaced only if ``DIR/config.json`` says a gtbus export wrote it.
  config.json is written last, so a half-finished export is never mistaken
  for a whole one.
* Reading an export (:func:`model_digest_of`, :func:`load_export`) names the
  file and what is wrong in one :class:`~gtbus.errors.ConfigError` line:
  missing, truncated, not safetensors, a tensor renamed, reshaped or of another
  dtype, a config that does not describe the tensors. :func:`load_export`
  also refuses weights whose digest is not the one config.json records
  (corruption, or tampering that did not also rewrite config.json; the signed
  manifest beside an export is what stands against a careful forger).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import blake3
import numpy

from gtbus.bounded_read import read_bounded
from gtbus.errors import ConfigError, GtbusError
from gtbus.export.digest import MEASURED_BACKENDS, digest_of_views, rebuild_views
from gtbus.export.layout import layout_of, trainer_for
from gtbus.export.llmc import LlmcHeader, padded_vocab, write_llmc
from gtbus.nodes.run_checkpoint import lane_state
from gtbus.private_files import private_dir, write_private
from gtbus.training.checkpoint import read_checkpoint
from gtbus.training.trainer import Trainer, WorkloadError
from gtbus.training.workloads import make_trainer

MODEL_FILE: Final = "model.safetensors"
CONFIG_FILE: Final = "config.json"
LLMC_FILE: Final = "gpt2_llmc.bin"
#: Every file name an export may write.
EXPORT_FILES: Final = (MODEL_FILE, CONFIG_FILE, LLMC_FILE)
#: config.json's ``format``: what marks a folder's files as a gtbus export's.
EXPORT_FORMAT: Final = "gtbus-export/1"
#: Largest config.json read (it is a few KiB; GPT-2's layout lists ~150 tensors).
MAX_CONFIG_BYTES: Final = 4 << 20


@dataclass(frozen=True)
class ExportedModel:
    """What :func:`export_model` wrote."""

    trainer: str  # "bytelm" | "gpt2" (the run's trainer name)
    config: dict[str, Any]  # what config.json holds (trainer, shape, dtype, vocab, ...)
    files: dict[str, str]  # file name in DIR -> blake3 hex of its bytes
    model_digest: bytes  # the run's device measurement of these weights (32 bytes)


@dataclass(frozen=True)
class LoadedExport:
    """An export read back and checked: its config and its trainer, on the host, holding the exported weights."""

    config: dict[str, Any]
    trainer: Trainer
    model_digest: bytes
    parameters: int  # how many the export's tensors hold

    def untrained(self) -> Trainer:
        """The same trainer with its initial (seed 0) weights: what the run started from."""
        return trainer_for(self.config, self.parameters)


def export_model(run_dir: Path, out: Path) -> ExportedModel:
    """Write the final model of ``run_dir`` (its checkpoint, ``checkpoints/*.npz``) into ``out``."""
    path = _checkpoint_path(Path(run_dir))
    ckpt = read_checkpoint(path)
    trainer_name = ckpt.workload.get("trainer") or _trainer_of_keys(ckpt.arrays, path)
    backend = ckpt.workload.get("backend") or "host"  # checkpoints before workloads were recorded: host runs
    if backend not in MEASURED_BACKENDS:
        raise ConfigError(f"{path}: trained on backend {backend!r}, whose measurement an export cannot reproduce ({', '.join(MEASURED_BACKENDS)})")
    trainer = make_trainer(trainer_name)
    trainer.load(numpy)
    try:
        trainer.load_state_dict(lane_state(ckpt.trainer_state(), 0))
    except WorkloadError as exc:
        raise ConfigError(f"{path}: does not fit the {trainer_name} trainer: {exc}") from None
    return export_trainer(trainer, Path(out), trainer_name=trainer_name, backend=backend, run_id=ckpt.run_id)


def export_trainer(trainer: Trainer, out: Path, *, trainer_name: str, backend: str = "host", run_id: str = "") -> ExportedModel:
    """Write ``trainer``'s model (loaded on the host) into ``out``; its digest in the form ``backend``'s device measures."""
    layout = layout_of(trainer_name, trainer)
    expected = digest_of_views(backend, [numpy.asarray(v) for v in trainer.parameter_views()])
    config: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "trainer": trainer_name,
        "shape": layout.shape,
        "dtype": "float32",
        "gtbus_version": _version(),
        "run_id": run_id,
        "model_digest": expected.hex(),
        "measurement": {"backend": backend, "views": [v.as_json() for v in layout.views]},
        "files": [MODEL_FILE, CONFIG_FILE] + ([LLMC_FILE] if trainer_name == "gpt2" else []),
    }
    if trainer_name == "gpt2":
        config.update(_hf_gpt2_keys(layout.shape))
    previous = _claim(out, config["files"])
    from safetensors.numpy import save

    write_private(out / MODEL_FILE, save(layout.tensors, metadata={"format": "pt"}))
    if trainer_name == "gpt2":
        shape = layout.shape
        header = LlmcHeader(shape["context"], shape["vocab"], shape["layers"], shape["heads"], shape["dim"], padded_vocab(shape["vocab"]))
        write_llmc(out / LLMC_FILE, layout.tensors, header)
    elif LLMC_FILE in previous:
        (out / LLMC_FILE).unlink(missing_ok=True)  # ours, of an earlier GPT-2 export: not this model's
    write_private(out / CONFIG_FILE, json.dumps(config, indent=1) + "\n")
    digest = model_digest_of(out)
    if digest != expected:
        raise GtbusError(f"{out}: the written files give model digest {digest.hex()[:16]}..., the trainer {expected.hex()[:16]}...")
    return ExportedModel(trainer_name, config, {name: _file_hash(out / name) for name in config["files"]}, digest)


def model_digest_of(out: Path) -> bytes:
    """The model digest recomputed from ``out/model.safetensors`` and ``out/config.json`` alone (numpy, host)."""
    config, views, _ = _read(Path(out))
    return digest_of_views(config["measurement"]["backend"], views)


def load_export(out: Path) -> LoadedExport:
    """The export in ``out`` as a host trainer holding its weights; refused unless they give config.json's digest."""
    out = Path(out)
    config, views, parameters = _read(out)
    digest = digest_of_views(config["measurement"]["backend"], views)
    if digest.hex() != config.get("model_digest"):
        raise ConfigError(f"{out / MODEL_FILE}: its weights do not give the model digest config.json records (corrupt or tampered)")
    try:
        trainer = trainer_for(config, parameters)
    except ConfigError as exc:
        raise ConfigError(f"{out}/{exc}") from None
    targets = trainer.parameter_views()
    if [(t.dtype, t.shape) for t in targets] != [(v.dtype, v.shape) for v in views]:
        raise ConfigError(f"{out / CONFIG_FILE}: its measured views do not fit the {config['trainer']} model its shape makes")
    for target, view in zip(targets, views):
        numpy.copyto(target, view)
    return LoadedExport(config, trainer, digest, parameters)


def _read(out: Path) -> tuple[dict[str, Any], list[numpy.ndarray], int]:
    """config.json (checked to be an export's), the measured views rebuilt from model.safetensors, and its parameter count."""
    config = _read_config(out / CONFIG_FILE)
    if config is None:
        raise ConfigError(f"{out}: not a gtbus export (no {CONFIG_FILE})")
    measurement = config.get("measurement")
    if not isinstance(measurement, dict) or measurement.get("backend") not in MEASURED_BACKENDS:
        raise ConfigError(f"{out / CONFIG_FILE}: measurement.backend must be one of {', '.join(MEASURED_BACKENDS)}")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = out / MODEL_FILE
    try:
        tensors = load_file(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    try:
        views = rebuild_views(tensors, measurement.get("views"))
    except ConfigError as exc:
        raise ConfigError(f"{out}/{exc}") from None  # its messages start with the file's name
    return config, views, sum(t.size for t in tensors.values())


def _read_config(path: Path) -> dict[str, Any] | None:
    """An export's config.json; None if there is none; ConfigError if it is there and not an export's."""
    if not os.path.lexists(path):
        return None
    raw = read_bounded(path, MAX_CONFIG_BYTES, "export config", follow=True, error=ConfigError)
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"{path}: not a gtbus export's config (no \"format\": \"{EXPORT_FORMAT}\")")
    return config


def _claim(out: Path, writing: list[str]) -> set[str]:
    """Make ``out`` ready for an export writing ``writing``: the files an earlier export wrote there; refuse anyone else's."""
    private_dir(out)
    try:
        previous = _read_config(out / CONFIG_FILE)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; refusing to overwrite it") from None
    listed = previous.get("files") if previous is not None else None
    ours = {f for f in listed if f in EXPORT_FILES} | {CONFIG_FILE} if isinstance(listed, list) else set()
    for name in writing:
        if name not in ours and os.path.lexists(out / name):
            raise ConfigError(f"{out / name}: already there and not written by a gtbus export; refusing to overwrite it")
    return ours


def _checkpoint_path(run_dir: Path) -> Path:
    folder = run_dir / "checkpoints"
    found = sorted(folder.glob("*.npz")) if folder.is_dir() else []
    if not found:
        raise ConfigError(f"{folder}: no checkpoint there (is {run_dir} a run folder?)")
    if len(found) > 1:
        raise ConfigError(f"{folder}: several checkpoints ({', '.join(p.name for p in found[:4])}); one orchestrator's run has one")
    return found[0]


def _trainer_of_keys(arrays: dict[str, Any], path: Path) -> str:
    # Checkpoints written before they named their workload: ByteLM's keys are
    # param/<name>, the torch trainer's model/<name>.
    if any(k.startswith("param/") for k in arrays):
        return "bytelm"
    if any(k.startswith("model/") for k in arrays):
        return "gpt2"
    raise ConfigError(f"{path}: names no trainer and holds no model it can be read as")


def _hf_gpt2_keys(shape: dict[str, int]) -> dict[str, Any]:
    """The Hugging Face GPT-2 config keys for this shape (``GPT2LMHeadModel.from_pretrained(DIR)`` reads them)."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": shape["vocab"],
        "n_positions": shape["context"],
        "n_embd": shape["dim"],
        "n_layer": shape["layers"],
        "n_head": shape["heads"],
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
    }


def _file_hash(path: Path) -> str:
    return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path).hexdigest()


def _version() -> str:
    try:
        return metadata.version("gtbus")
    except metadata.PackageNotFoundError:
        return "unknown"
