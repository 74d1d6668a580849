"""``gtbus holder-receipt check``: a data holder checks a training manifest against its receipt and its own data.

The holder needs nothing from anyone but the manifest: its receipt (what the
orchestrator signed to it at the run's end), its key (the commitment key is
derived from it) and its data. It checks both signatures under the
orchestrator key it pins (``--keys``), that the receipt names this manifest,
that every chunk it provided appears with the commitment it computes from its
data, that no chunk appears twice in a round, and that none appears that it did
not provide or that the receipt lacks. One line per finding; exit 1 on any.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gtbus.cli.export import pinned_orchestrator_key, read_manifest
from gtbus.console import printable
from gtbus.messages.identity import load_identity
from gtbus.provenance.commitment import dataset_commitments
from gtbus.provenance.document import ProvenanceError, read_document
from gtbus.provenance.receipt import check_with_receipt, parse_receipt


def _setting(settings: dict[str, object], key: str, where: Path) -> int:
    value = settings.get(key)
    if type(value) is not int or not 1 <= value <= 1 << 31:
        raise ProvenanceError(f"{where}: settings.{key} is not a usable number")
    return value


@click.group("holder-receipt")
def holder_receipt() -> None:
    """A data holder's receipts of the runs its data trained."""


@holder_receipt.command("check")
@click.option("--receipt", "receipt_path", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The receipt this holder stored (RUN_DIR/receipts/NAME/RUN_ID.json).")
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The training manifest to check (beside an exported model, or RUN/provenance/manifest.json).")
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), required=True, help="This holder's secret key file.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="The deployment's public keys (the orchestrator's is the one pinned).")
@click.option("--data", "data_paths", multiple=True, required=True, type=click.Path(path_type=Path), help="This holder's data, as given to `gtbus holder`.")
@click.option("--raw", is_flag=True, help="The data are raw files (as `gtbus holder --raw`).")
def check(receipt_path: Path, manifest_path: Path, key_path: Path, keys_dir: Path, data_paths: tuple[Path, ...], raw: bool) -> None:
    """Check a manifest against this holder's receipt and data: one line per finding, exit 1 on any."""
    from gtbus.training.shards import Dataset

    identity = load_identity(key_path)
    orchestrator_key = pinned_orchestrator_key(keys_dir)
    assert orchestrator_key is not None
    manifest = read_manifest(manifest_path)
    chunk_tokens = _setting(manifest.settings, "chunk_tokens", manifest_path)
    dataset = Dataset(list(data_paths), raw=raw, name=identity.name)
    max_hops = dataset.chunk_count(chunk_tokens) * _setting(manifest.settings, "rounds", manifest_path)
    receipt = parse_receipt(read_document(receipt_path), str(receipt_path), max_hops=max_hops)
    commitments = dataset_commitments(dataset, chunk_tokens, bytes(identity.signing_key), manifest.run_id)
    findings = check_with_receipt(manifest, receipt, identity.name, orchestrator_key, commitments)
    for f in findings:
        click.echo(printable(f"FAIL {f}"))
    if findings:
        sys.exit(1)
    click.echo(printable(f"ok   run {manifest.run_id}: {len(receipt.hops)} hops of {identity.name}'s chunks, each with the commitment "
                         f"its data gives, as its receipt and the manifest both say, signed by {manifest.orchestrator}"))
