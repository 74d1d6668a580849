"""``gtbus attest``: gather attestation collateral where a network exists, appraise evidence where none does.

The air-gapped procedure (runbooks/README.md walks through it):

1. On a connected machine, ``gtbus attest fetch --out BUNDLE --from SOURCES.toml``
   downloads each collateral, CRL, OCSP response and certificate the sources
   file names, reads the validity period each states about itself, and writes
   the bundle (files 0600, manifest with BLAKE3 last).
2. Carry the bundle folder across the gap.
3. Offline, ``gtbus attest check EVIDENCE --bundle BUNDLE --policy POLICY.toml
   --nonce HEX`` appraises the evidence against the policy with only the
   bundle's files, and prints one line per finding; exit status 1 on any failure.

SOURCES.toml lists files::

    [[file]]
    name = "tdx-collateral.json"      # the name inside the bundle
    kind = "tdx-collateral"           # crl | ocsp | cert | tdx-collateral | driver-rim | vbios-rim
    url = "https://pccs.example/..."  # http(s)://; or path = "local/file" (relative to SOURCES.toml)

An NVIDIA RIM (kind driver-rim or vbios-rim) is kept as its XML: from a file,
or from NVIDIA's RIM service, whose JSON answer ({"rim": base64}) is decoded
(url = "https://rim.attestation.nvidia.com/v1/rim/NV_GPU_DRIVER_GH100_550.90.07").
"""

from __future__ import annotations

import datetime as dt
import math
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Final

import click

# The attestation modules (cryptography, nacl, dcap-qvl) load when a command runs, not with every `gtbus`.
if TYPE_CHECKING:
    from gtbus.attest.bundle import Bundle
    from gtbus.attest.policy import PolicySettings
    from gtbus.attest.verifier import Verifier

from gtbus.console import printable
from gtbus.errors import ConfigError

MAX_SOURCES_FILE: Final = 1 << 20
FETCH_TIMEOUT_S: Final = 30.0
SOURCE_KEYS: Final = frozenset({"name", "kind", "url", "path"})

attest = click.Group(name="attest", help="Gather attestation collateral into a bundle; appraise evidence offline against it.")


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_limited(path: Path, limit: int, what: str) -> bytes:
    """A file the user named (a link is fine), its size checked before reading; one line otherwise."""
    from gtbus.attest.bundle import read_bounded

    return read_bounded(path, limit, what, follow=True)


def _download(url: str, limit: int) -> bytes:
    """GET ``url`` (http or https only), at most ``limit`` bytes; ConfigError of one line on any failure."""
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{url}: only http:// and https:// URLs are fetched (use path = for a local file)")
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as resp:  # noqa: S310 (scheme checked above)
            data: bytes = resp.read(limit + 1)
    except urllib.error.HTTPError as exc:
        raise ConfigError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ConfigError(f"{url}: cannot fetch: {reason}") from None
    if len(data) > limit:
        raise ConfigError(f"{url}: over the {limit}-byte limit")
    if not data:
        raise ConfigError(f"{url}: empty response")
    return data


def _load_sources(path: Path) -> list[dict[str, str]]:
    """The [[file]] entries of a sources file, each checked; ConfigError naming the entry otherwise."""
    from gtbus.attest.bundle import FILE_KINDS, MAX_FILES

    try:
        doc = tomllib.loads(_read_limited(path, MAX_SOURCES_FILE, "sources file").decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    if set(doc) != {"file"} or not isinstance(doc["file"], list) or not doc["file"]:
        raise ConfigError(f"{path}: must hold only [[file]] entries, at least one")
    if len(doc["file"]) > MAX_FILES:
        raise ConfigError(f"{path}: at most {MAX_FILES} [[file]] entries")
    entries = []
    for i, e in enumerate(doc["file"]):
        where = f"{path}: [[file]] {i + 1}"
        if not isinstance(e, dict) or not set(e) <= SOURCE_KEYS:
            raise ConfigError(f"{where}: keys are name, kind and url or path")
        if not all(isinstance(v, str) and v for v in e.values()):
            raise ConfigError(f"{where}: every value must be a non-empty string")
        if "name" not in e or "kind" not in e or ("url" in e) == ("path" in e):
            raise ConfigError(f"{where}: needs name, kind, and exactly one of url or path")
        if e["kind"] not in FILE_KINDS:
            raise ConfigError(f"{where}: kind {e['kind']!r} is not one of {', '.join(FILE_KINDS)}")
        entries.append(e)
    return entries


@attest.command("fetch")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="The bundle folder to write.")
@click.option("--from", "sources", required=True, type=click.Path(dir_okay=False, path_type=Path), help="SOURCES.toml: the files to gather.")
@click.option("--force", is_flag=True, help="Replace a bundle already at --out.")
@click.option("--allow-stale", is_flag=True, help="Keep files already expired (to re-appraise old evidence as of its date).")
def fetch(out: Path, sources: Path, force: bool, allow_stale: bool) -> None:
    """Gather collateral and revocation files into an offline bundle (run where a network exists)."""
    from gtbus.attest.bundle import MANIFEST_NAME, MAX_FILE_SIZE, BundleFile, validity_of, write_bundle
    from gtbus.attest.verifier import AttestationError

    if (out / MANIFEST_NAME).exists() and not force:
        raise ConfigError(f"{out}: already holds a bundle; --force to replace it")
    now = time.time()
    files: list[BundleFile] = []
    for e in _load_sources(sources):
        origin = e.get("url") or str((sources.parent / e["path"]).resolve())
        if "url" in e:
            data = _download(e["url"], MAX_FILE_SIZE)
        else:
            data = _read_limited(sources.parent / e["path"], MAX_FILE_SIZE, e["kind"])
        if e["kind"] in ("driver-rim", "vbios-rim"):
            from gtbus.attest.nvidia_rim import rim_from_service

            data = rim_from_service(data)
        not_before, not_after = validity_of(e["kind"], data, e["name"])
        f = BundleFile(e["name"], e["kind"], origin, now, not_before, not_after, data)
        if not_after < now:
            # Carrying a file already stale across the gap would only fail there; say so here.
            if not allow_stale:
                raise AttestationError(f"{e['name']}: {origin} expired at {_iso(not_after)}; the source is stale (--allow-stale keeps it)")
            click.echo(f"warn {printable(f.name)} expired at {_iso(not_after)} (kept: --allow-stale)")
        files.append(f)
        click.echo(f"fetched {printable(f.name)} ({f.kind}) from {printable(origin)}, valid {_iso(not_before)} .. {_iso(not_after)}")
    root = write_bundle(out, files)
    click.echo(f"wrote bundle {root} ({len(files)} files, {MANIFEST_NAME} with BLAKE3 of each)")


def _parse_now(value: str | None) -> float:
    """Seconds since the epoch from an ISO date-time (UTC unless it says otherwise), or now."""
    if value is None:
        return time.time()
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO date-time such as 2025-07-01T00:00:00Z", param_hint="--now") from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()


def _parse_nonce(value: str) -> bytes:
    from gtbus.attest.verifier import NONCE_SIZE

    try:
        nonce = bytes.fromhex(value)
    except ValueError:
        raise click.BadParameter("not hex", param_hint="--nonce") from None
    if len(nonce) != NONCE_SIZE:
        raise click.BadParameter(f"must be {NONCE_SIZE} bytes ({2 * NONCE_SIZE} hex digits), got {len(nonce)}", param_hint="--nonce")
    return nonce


def _verifier(kind: str, bundle: Bundle, settings: PolicySettings) -> Verifier:
    """The verifier of ``kind``; the TDX one takes its collateral from the bundle, the NVIDIA one its RIMs."""
    if kind == "tdx":
        from gtbus.attest.tdx import TdxVerifier

        return TdxVerifier(bundle)
    if kind == "nvidia-gpu":
        from gtbus.attest.appraiser import nvidia_rims
        from gtbus.attest.nvidia import NvidiaVerifier

        return NvidiaVerifier(nvidia_rims(settings, bundle), settings.rim_roots)
    from gtbus.attest.emulated import EmulatedVerifier

    return EmulatedVerifier()


@attest.command("check")
@click.argument("evidence", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--kind", default=None, help="The evidence's kind: emulated, tdx or nvidia-gpu (default: the policy's).")
@click.option("--bundle", "bundle_path", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The offline bundle (default: the policy's bundle).")
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="POLICY.toml.")
@click.option("--nonce", required=True, help="The 32-byte nonce the evidence answers, in hex.")
@click.option("--now", default=None, help="Appraise as of this ISO date-time (default: now).")
def check(evidence: Path, kind: str | None, bundle_path: Path | None, policy_path: Path, nonce: str, now: str | None) -> None:
    """Appraise EVIDENCE offline against a bundle and a policy: one line per finding, exit 1 on any failure."""
    from gtbus.attest.bundle import Bundle, BundleRevocation, read_bundle
    from gtbus.attest.policy import load_policy
    from gtbus.attest.verifier import KINDS, MAX_EVIDENCE_SIZE, AttestationError, Evidence, Revocation

    if kind is not None and kind not in KINDS:
        raise click.BadParameter(f"{kind!r} is not one of {', '.join(KINDS)}", param_hint="--kind")

    nonce_bytes = _parse_nonce(nonce)
    at = _parse_now(now)
    settings = load_policy(policy_path)
    policy = settings.policy
    kind = kind or policy.kind
    if kind != policy.kind:
        raise ConfigError(f"{policy_path}: the policy is for kind {policy.kind}, the evidence is {kind}")
    if policy.revocation is Revocation.ONLINE:
        raise ConfigError(f"{policy_path}: revocation = \"online\" needs a network; `attest check` is offline (use offline or cached)")
    where = bundle_path or settings.bundle
    if where is None and kind != "emulated":
        raise ConfigError(f"no bundle: {kind} evidence needs one (--bundle, or bundle = ... in the policy)")
    blob = _read_limited(evidence, MAX_EVIDENCE_SIZE, "evidence file")
    # The emulated kind has no collateral or certificates: without a bundle it is appraised on the policy alone.
    bundle = read_bundle(where) if where is not None else Bundle(Path("."), ())
    failed = False
    if where is not None:
        click.echo(f"ok   bundle {where}: {len(bundle.files)} files, manifest and BLAKE3 match")
    for f in bundle.files:
        try:
            f.require_valid(at, policy.grace_s)
            click.echo(f"ok   {printable(f.name)} ({f.kind}) valid {_iso(f.not_before)} .. {_iso(f.not_after)}")
        except AttestationError as exc:
            # Stale but unused files do not fail the check by themselves; the appraisal says if one was needed.
            click.echo(f"warn {printable(str(exc))}")
    try:
        claims = _verifier(kind, bundle, settings).appraise(
            Evidence(kind, blob, nonce_bytes), nonce_bytes, policy, at, BundleRevocation(bundle, policy.grace_s)
        )
    except AttestationError as exc:
        click.echo(f"FAIL {printable(str(exc))}")
        failed = True
    else:
        until = "no expiry" if math.isinf(claims.not_after) else f"good until {_iso(claims.not_after)}"
        click.echo(f"ok   {kind} evidence appraised at {_iso(at)}; {until}")
        if kind == "nvidia-gpu":
            from gtbus.attest.appraiser import nvidia_rims

            for which in sorted(nvidia_rims(settings, bundle)):
                click.echo(f"ok   {which} RIM: signed up to the policy's rim_roots, its version and every active measurement match")
        for name in sorted(policy.pinned):
            click.echo(f"ok   pinned {printable(name)} = {claims.measurements[name].hex()}")
        for name, value in sorted(claims.versions.items()):
            click.echo(f"ok   version {printable(name)} = {printable(value)}")
        click.echo(f"ok   report_data = {claims.report_data.hex()}")
    if failed:
        click.get_current_context().exit(1)


@attest.command("pack-nvidia")
@click.argument("report", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("chain", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The evidence file to write (for `attest check --kind nvidia-gpu`).")
def pack_nvidia(report: Path, chain: Path, out: Path) -> None:
    """Make nvidia-gpu EVIDENCE from the files NVIDIA's tools write: the attestation report (hex) and its certificate chain (PEM, leaf first)."""
    from gtbus.attest.nvidia import MAX_CHAIN_LENGTH, MAX_CERT_SIZE, MAX_REPORT_SIZE, evidence_from_nvidia_files
    from gtbus.attest.verifier import AttestationError
    from gtbus.private_files import write_private

    report_hex = _read_limited(report, 2 * MAX_REPORT_SIZE + 64, "report file")
    chain_pem = _read_limited(chain, MAX_CHAIN_LENGTH * 2 * MAX_CERT_SIZE, "chain file")
    try:
        blob = evidence_from_nvidia_files(report_hex, chain_pem)
    except AttestationError as exc:
        raise ConfigError(str(exc)) from None
    write_private(out, blob)
    click.echo(f"wrote {printable(str(out))}: nvidia-gpu evidence, {len(blob)} bytes")
