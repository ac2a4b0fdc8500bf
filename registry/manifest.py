"""The checksum manifest of a version: sha256 and size per file, written at registration, checked on download.

Its own digest is a param of the version's run (in the registry database, apart from the artifacts),
so a changed manifest is caught as surely as a changed weight file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from layermoe_core.errors import LayerMoEError
from layermoe_core.model.files import list_model_files, path_inside, refuse_custom_code, refuse_pickles, require_loadable

MANIFEST_NAME = "layermoe_files.json"
MANIFEST_FORMAT = "layermoe-files/1"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(model_dir: Path, files: list[str]) -> str:
    """The manifest as the exact JSON text that is stored (its sha256 is the version's digest)."""
    entries = {name: {"sha256": sha256_file(model_dir / name), "bytes": (model_dir / name).stat().st_size} for name in files}
    return json.dumps({"format": MANIFEST_FORMAT, "files": entries}, indent=1, sort_keys=True)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def verify_model_dir(model_dir: Path, expected_digest: str, what: str, written_sha256: Mapping[str, str] | None = None) -> None:
    """Raise LayerMoEError naming the first file that is missing, unexpected, a pickle, truncated or corrupt, or code (auto_map).
    `written_sha256`: as in `verify_listed_files`."""
    present = verify_listed_files(model_dir, MANIFEST_NAME, expected_digest, what, written_sha256=written_sha256)
    require_loadable(present, what)
    refuse_custom_code(model_dir)


def verify_listed_files(
    folder: Path,
    listing_name: str,
    expected_digest: str,
    what: str,
    ignore: tuple[str, ...] = (),
    written_sha256: Mapping[str, str] | None = None,
    sized_only: tuple[str, ...] = (),
) -> list[str]:
    """The one check of a folder against its listing (a manifest, or a version's stored files): the listing's digest is
    the one recorded at registration, and every file listed is there, inside the folder, with its registered size and
    sha256, and no other (no pickle) beside it. `ignore`: files others add (MLflow's `registered_model_meta`).
    `written_sha256`: file -> sha256 taken by whoever wrote the file as it wrote it, used instead of reading it back.
    `sized_only`: suffixes of files whose bytes the caller checks where it uses them; here only their size.
    Returns the files present."""
    written = written_sha256 or {}
    listing = folder / listing_name
    if not listing.is_file():
        raise LayerMoEError(f"{what} has no {listing_name}; register the model with registry.register_base/register_child")
    if sha256_file(listing) != expected_digest:
        raise LayerMoEError(f"{what}: {listing_name} does not match the digest recorded at registration; the artifacts were altered")
    expected = {name: (path_inside(folder, name, what), entry) for name, entry in json.loads(listing.read_text())["files"].items()}
    present = list_model_files(folder, exclude=(listing_name, *ignore))
    refuse_pickles(present, what)
    unexpected = [f for f in present if f not in expected]
    missing = [f for f in expected if f not in present]
    if unexpected or missing:
        raise LayerMoEError(f"{what}: files missing {missing}, files not in {listing_name} {unexpected}; re-register the version")
    for name, (path, entry) in expected.items():
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise LayerMoEError(
                f"{what}: {name} is truncated or corrupt ({size} bytes, registered with {entry['bytes']}); "
                "download again, or re-register the version from its checkpoint"
            )
        if name.endswith(sized_only):
            continue
        if (written[name] if name in written else sha256_file(path)) != entry["sha256"]:
            raise LayerMoEError(
                f"{what}: {name} is corrupt (sha256 differs from the one registered); "
                "download again, or re-register the version from its checkpoint"
            )
    return present
