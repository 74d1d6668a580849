"""``gtbus export``: the trained model out of a run, with its signed manifest; ``--check`` verifies one.

``gtbus export RUN --out DIR`` writes the model files (:mod:`gtbus.export.model_files`)
and copies the run's signed training manifest beside them, refusing (one
line) when the exported weights are not the model the manifest names.

``gtbus export --check DIR [--logs RUN/logs] [--keys KEYS]`` checks an
export: the manifest's signature (under the key it names, or the
orchestrator's in ``--keys``), its consistency (each chunk once per round,
every model digest explained by an earlier hop or merge), the model files
against its final digest, and with the logs (verified first, as ``gtbus replay
--verify`` does) that every listed hop is a holder-signed ``token.return``
with the same commitment, bytes and chunk and a published ``trained``
outcome, and that no hop the logs call trained is missing. One line per
finding; exit status 1 on any.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gtbus.console import printable
from gtbus.errors import GtbusError
from gtbus.messages.identity import Role, Roster
from gtbus.provenance.document import read_document, write_document
from gtbus.provenance.manifest import (
    MANIFEST_FILE,
    Manifest,
    RecordedHops,
    check_consistency,
    check_logs,
    check_model,
    check_signature,
    parse_manifest,
)


def read_manifest(path: Path) -> Manifest:
    """The manifest file at ``path``, parsed (ProvenanceError, one line, if it is not one)."""
    return parse_manifest(read_document(path), str(path))


def pinned_orchestrator_key(keys_dir: Path | None) -> bytes | None:
    """The orchestrator's Ed25519 key from a deployment's key folder (None without one)."""
    if keys_dir is None:
        return None
    orchs = Roster.from_dir(keys_dir).by_role(Role.ORCHESTRATOR)
    if len(orchs) != 1:
        raise click.ClickException(f"{keys_dir}: expected one orchestrator's public key, found {len(orchs)}")
    return orchs[0].ed25519


def recorded_hops(logs: Path) -> tuple[RecordedHops, set[bytes]]:
    """The hops the orchestrator's logs under ``logs`` prove (the logs verified first) and the orchestrator keys they pin."""
    from gtbus.recording import iter_log, roster_of
    from gtbus.replay.hop_spans import orchestrator_logs
    from gtbus.replay.verify import header_of, message_of

    recorded = RecordedHops()
    keys: set[bytes] = set()
    for p in orchestrator_logs(logs):
        for rec in iter_log(p):
            if rec.kind == "meta":
                keys.update(m.ed25519 for m in roster_of(rec, p).by_role(Role.ORCHESTRATOR))
                continue
            if rec.kind != "msg" or str(rec.data.get("verdict")).startswith("rejected"):
                continue
            h = header_of(rec)
            msg = message_of(rec, h) if h is not None else None
            if h is not None and msg is not None:
                recorded.feed(str(rec.data.get("dir")), h, msg)
    return recorded, keys


def check_export(out: Path, logs: Path | None, pinned: bytes | None) -> tuple[list[str], Manifest]:
    """Every finding about the export in ``out`` (an empty list: it checks out) and its manifest."""
    from gtbus.export.model_files import model_digest_of

    m = read_manifest(out / MANIFEST_FILE)
    findings = check_signature(m, pinned) + check_consistency(m)
    try:
        findings += check_model(m, model_digest_of(out))
    except GtbusError as exc:
        findings.append(f"model files: {exc}")
    if logs is not None:
        recorded, keys = recorded_hops(logs)
        if m.orchestrator_key not in keys:
            findings.append(f"the manifest's orchestrator key {m.orchestrator_key.hex()[:16]}... is not the one the logs pin")
        findings += check_logs(m, recorded)
    return findings, m


@click.command("export")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), help="Folder for the model files and the manifest.")
@click.option("--check", "check", is_flag=True, help="Check the export in PATH instead: manifest signature, model files, and (with --logs) the recorded messages.")
@click.option("--logs", type=click.Path(path_type=Path), help="With --check: the run's message logs (RUN/logs); every listed hop must match what the holders signed.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path), help="With --check: the deployment's public keys; the manifest must be signed by its orchestrator.")
def export(path: Path, out: Path | None, check: bool, logs: Path | None, keys_dir: Path | None) -> None:
    """Export a run's model (safetensors + config, llm.c for GPT-2) with its signed manifest, or --check an export."""
    if check:
        if out is not None:
            raise click.UsageError("--check takes the export folder as PATH, not --out")
        findings, m = check_export(path, logs, pinned_orchestrator_key(keys_dir))
        for f in findings:
            click.echo(printable(f"FAIL {f}"))
        if findings:
            sys.exit(1)
        proof = " and agrees with the logs" if logs is not None else ""
        # Without a pin the signature only shows the manifest is whole: anyone can sign one with a key of their own.
        who = "" if logs is not None or keys_dir is not None else " (a key the manifest names itself: pin it with --keys or --logs)"
        click.echo(printable(f"ok   {path}: run {m.run_id}, {len(m.hops)} trained hops, model {m.final_model.hex()[:16]}... as signed by {m.orchestrator}{who}{proof}"))
        return
    if out is None or logs is not None or keys_dir is not None:
        raise click.UsageError("export RUN takes --out DIR (--logs and --keys go with --check)")
    from gtbus.export.model_files import export_model
    from gtbus.nodes.run_provenance import manifest_path

    if not (path / "checkpoints").is_dir():
        raise click.ClickException(f"{path}: not a run folder (no checkpoints/ in it)")
    if not manifest_path(path).exists():
        raise click.ClickException(f"{manifest_path(path)}: no manifest: the run has not completed (it is written when the run ends)")
    m = read_manifest(manifest_path(path))
    bad = check_signature(m)
    if bad:
        raise click.ClickException(f"{manifest_path(path)}: {bad[0]}")
    exported = export_model(path, out)
    if exported.model_digest != m.final_model:
        raise click.ClickException(
            f"{path}: its checkpoint's model {exported.model_digest.hex()[:16]}... is not the manifest's final model "
            f"{m.final_model.hex()[:16]}... (the checkpoint is not the completed run's): {out} has no manifest")
    write_document(out / MANIFEST_FILE, m.doc)
    click.echo(printable(f"exported run {m.run_id} to {out}: {', '.join(sorted(exported.files))} and {MANIFEST_FILE} "
                         f"({len(m.hops)} trained hops, model {m.final_model.hex()[:16]}...)"))
