"""Fetch a version's model directory, rebuilt from its lineage where it is a delta, verified before anyone loads it."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow.artifacts
from mlflow import MlflowClient
from pydantic import BaseModel, ConfigDict

from layermoe_core.errors import LayerMoEError
from layermoe_core.model.files import WEIGHTS_SUFFIX

from .client import (
    STORE_FAILURES,
    as_registry_error,
    open_client,
    store_errors,
)
from .failures import RegistryUnavailable
from .listing import read_listing
from .manifest import MANIFEST_NAME, sha256_file, verify_listed_files, verify_model_dir
from .settings import RegistrySettings
from .storage import (
    LAYOUT_NAME,
    STORED_NAME,
    TENSORS_NAME,
    FileSource,
    ParentFiles,
    compose_digests,
    locate_files,
    write_full_model,
)
from .versions import VersionInfo, VersionRef, find_version

logger = logging.getLogger(__name__)


class LocalVersion(BaseModel):
    """A verified local copy of a version: AutoModelForCausalLM.from_pretrained(path) loads it once
    `layermoe_core.model.modeling_layermoe` is imported (that import registers the model type)."""

    model_config = ConfigDict(frozen=True)

    path: Path
    info: VersionInfo

    @property
    def version(self) -> int:
        return self.info.version

    @property
    def tags(self) -> dict[str, str]:
        return self.info.tags

    @property
    def run_id(self) -> str | None:
        return self.info.run_id


def _what(info: VersionInfo) -> str:
    return f"version {info.version} of {info.name!r}"


def _artifact_uri(client: MlflowClient, info: VersionInfo) -> str:
    """Where the version's files are. A version registered from a run (source `runs:/<run_id>/<dir>`) has them under
    the run's artifact root, read directly: MLflow resolving a `runs:` URI looks for logged models on every call."""
    prefix = f"runs:/{info.run_id}/"
    if info.artifact_uri and info.source.startswith(prefix):
        return f"{info.artifact_uri.rstrip('/')}/{info.source.removeprefix(prefix)}"
    return client.get_model_version_download_uri(info.name, str(info.version))


def _download_failed(settings: RegistrySettings, info: VersionInfo, error: Exception) -> LayerMoEError:
    kind = RegistryUnavailable if isinstance(as_registry_error(settings, error), RegistryUnavailable) else LayerMoEError
    return kind(f"downloading {_what(info)} from {settings.tracking_uri} failed ({error}); check the artifact store, then retry")


def _download_artifacts(client: MlflowClient, settings: RegistrySettings, info: VersionInfo, dst: Path, path: str | None = None) -> Path:
    try:
        uri = _artifact_uri(client, info)
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{uri.rstrip('/')}/{path}" if path else uri,
                dst_path=str(dst),
                tracking_uri=settings.tracking_uri,
                registry_uri=settings.tracking_uri,
            )
        )
    except STORE_FAILURES as e:
        raise _download_failed(settings, info, e) from e


def _local_store_folder(client: MlflowClient, settings: RegistrySettings, info: VersionInfo) -> Path | None:
    """The folder of the version's stored files where the artifact store is a folder of this machine (a path or file:
    URI): read in place, never copied; None for a remote store."""
    try:
        location = _artifact_uri(client, info)
        uri = urlparse(location)
        if uri.scheme not in ("", "file"):
            return None
        folder = Path(unquote(uri.path)) if uri.scheme == "file" else Path(location)
        if not folder.is_dir():
            raise FileNotFoundError(f"no folder {folder}")
        return folder
    except STORE_FAILURES as e:
        raise _download_failed(settings, info, e) from e


def stored_files(client: MlflowClient, settings: RegistrySettings, info: VersionInfo, every_byte: bool = False) -> Path:
    """The folder of the version's own stored files, checked against its listing: in place in a local store, else
    downloaded once into the cache. Weights are checked for size here and byte for byte in the model rebuilt from
    them (`rebuild_verified`), so each byte is read once; `every_byte` checks their sha256 here too."""
    digest, what = info.stored_sha256 or "", _what(info)
    sized_only = () if every_byte else (WEIGHTS_SUFFIX,)
    in_store = _local_store_folder(client, settings, info)
    if in_store is not None:
        verify_listed_files(in_store, STORED_NAME, digest, what, sized_only=sized_only)
        return in_store
    cached = settings.version_cache(info.version)
    if cached.is_dir():
        if every_byte:
            verify_listed_files(cached, STORED_NAME, digest, what)
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent, prefix=f".{cached.name}-partial-") as staging:
        local = _download_artifacts(client, settings, info, Path(staging))
        verify_listed_files(local, STORED_NAME, digest, what, sized_only=sized_only)
        try:
            local.rename(cached)
        except OSError:  # a concurrent download put its checked copy in place first
            pass
    return cached


def model_versions(settings: RegistrySettings) -> dict[int, VersionInfo]:
    """Every version of the registered model by number, from one read of the store (the listing's reader), so a
    lineage is walked in memory rather than asked of the store a version at a time."""
    return {info.version: info for info in read_listing(settings).versions}


def _sources(
    client: MlflowClient,
    settings: RegistrySettings,
    info: VersionInfo,
    versions: Mapping[int, VersionInfo],
    seen: tuple[int, ...] = (),
) -> dict[str, FileSource]:
    """Where every file of `info`'s full model is, following delta references down the lineage; `versions`: the
    registered model's versions (`model_versions`)."""
    if info.version in seen:
        raise LayerMoEError(f"the lineage of version {seen[0]} loops at version {info.version}; its layouts are corrupt")
    return _sources_from(client, settings, stored_files(client, settings, info), _what(info), versions, (*seen, info.version))


def _sources_from(
    client: MlflowClient,
    settings: RegistrySettings,
    stored: Path,
    what: str,
    versions: Mapping[int, VersionInfo],
    seen: tuple[int, ...],
) -> dict[str, FileSource]:
    """`_sources` of the version whose own stored files, checked, are in `stored`; `what` names it in errors."""
    parent = _linked_parent(stored, what, versions)
    parent_sources = None if parent is None else _sources(client, settings, parent, versions, seen)
    return locate_files(stored, parent_sources, what)


def _linked_parent(stored: Path, what: str, versions: Mapping[int, VersionInfo]) -> VersionInfo | None:
    """The version that the layout in `stored` is a delta on, checked to be the one it was registered against."""
    parent_ref = json.loads((stored / LAYOUT_NAME).read_text())["parent"]
    if parent_ref is None:
        return None
    parent = versions.get(parent_ref["version"])
    if parent is None:
        raise LayerMoEError(
            f"{what} is stored as a delta on version {parent_ref['version']}, which is missing (the registered "
            f"model has versions {sorted(versions)}); its lineage is broken: restore that version or re-register this "
            "one from its checkpoint"
        )
    if parent.manifest_sha256 != parent_ref["manifest_sha256"] or parent.stored_sha256 is None:
        raise LayerMoEError(
            f"{what} is stored as a delta on version {parent.version}, but that version's files are not "
            "the ones it was registered against; its lineage is broken: re-register it from its checkpoint"
        )
    return parent


def fetch_parent_files(client: MlflowClient, settings: RegistrySettings, parent: VersionInfo) -> ParentFiles | None:
    """The parent's manifest and the digests of every tensor of its model (small files, no weights); None for a version
    stored before deltas. Each version stores only its own tensors' digests, so the parent's are composed down its
    lineage from each ancestor's layout and digests: read in place from a local store or the cache, else fetched;
    each checked against the version's stored listing."""
    if parent.stored_sha256 is None:
        return None
    with tempfile.TemporaryDirectory(prefix="layermoe-parent-") as staging:
        folder = _listings(client, settings, parent, Path(staging), (MANIFEST_NAME, LAYOUT_NAME, TENSORS_NAME))
        versions = _versions_for(settings, folder)
        return ParentFiles(
            version=parent.version,
            manifest_sha256=parent.manifest_sha256,
            manifest=json.loads((folder / MANIFEST_NAME).read_text())["files"],
            tensors=_digests_from(client, settings, folder, _what(parent), versions, Path(staging), (parent.version,)),
        )


def _digests_from(
    client: MlflowClient,
    settings: RegistrySettings,
    stored: Path,
    what: str,
    versions: Mapping[int, VersionInfo],
    staging: Path,
    seen: tuple[int, ...],
) -> dict[str, dict[str, str]]:
    """Every tensor digest of the model of the version whose layout and own digests, checked, are in `stored`,
    composed down its lineage as `_sources` composes its files; the ancestors' listings fetched into `staging` where
    they are neither in a local store nor in the cache."""
    parent = _linked_parent(stored, what, versions)
    if parent is None:
        return compose_digests(stored, None, what)
    if parent.version in seen:
        raise LayerMoEError(f"the lineage of version {seen[0]} loops at version {parent.version}; its layouts are corrupt")
    listings = _listings(client, settings, parent, staging, (LAYOUT_NAME, TENSORS_NAME))
    parent_digests = _digests_from(client, settings, listings, _what(parent), versions, staging, (*seen, parent.version))
    return compose_digests(stored, parent_digests, what)


def _versions_for(settings: RegistrySettings, stored: Path) -> dict[int, VersionInfo]:
    """The registered model's versions where the layout in `stored` names a parent (one read of the store), else none."""
    return model_versions(settings) if json.loads((stored / LAYOUT_NAME).read_text())["parent"] is not None else {}


def _listings(client: MlflowClient, settings: RegistrySettings, info: VersionInfo, staging: Path, names: tuple[str, ...]) -> Path:
    """A folder holding `info`'s stored listing and its small files `names`, each checked against the listing: its own
    folder in a local store or the cache, else fetched into `staging`."""
    cached = settings.version_cache(info.version)
    folder = _local_store_folder(client, settings, info) or (cached if cached.is_dir() else staging / f"v{info.version}")
    names = (STORED_NAME, *names)
    if folder == staging / f"v{info.version}":
        folder.mkdir()
        for name in names:
            _download_artifacts(client, settings, info, folder, name)
    if any((folder / name).is_symlink() for name in names):
        raise LayerMoEError(f"{_what(info)}: a stored listing is a symlink; the artifacts were altered")
    listing = json.loads((folder / STORED_NAME).read_text())["files"]
    if sha256_file(folder / STORED_NAME) != info.stored_sha256 or any(
        name not in listing or sha256_file(folder / name) != listing[name]["sha256"] for name in names[1:]
    ):
        raise LayerMoEError(f"{_what(info)}: its stored listings differ from the ones registered; the artifacts were altered")
    return folder


# A version's own stored files, checked against their listing (`stored_files`): the weights by size, or with
# every_byte=True byte for byte, a damaged copy refused or, where it can be fetched again, replaced.
OwnFiles = Callable[[bool], Path]


def rebuild_verified(client: MlflowClient, settings: RegistrySettings, own: OwnFiles, what: str, manifest_sha256: str, built: Path) -> None:
    """The full model of the version whose own stored files `own` gives, written to `built` and verified against its
    manifest; `what` names the version in errors. When that fails, every stored file of the lineage is checked byte
    for byte (a damaged file in a local store or in `own` is named, a damaged cached copy is dropped and fetched
    again) and the model is written once more."""
    stored = own(False)
    versions = _versions_for(settings, stored)
    try:
        _write_and_verify(client, settings, stored, what, manifest_sha256, versions, built)
    except LayerMoEError as e:
        logger.warning("%s; checking every byte of the stored files it is rebuilt from", e)
        shutil.rmtree(built, ignore_errors=True)
        for version in _ancestors(client, settings, own(True), versions):
            _check_every_byte(client, settings, version)
        _write_and_verify(client, settings, own(False), what, manifest_sha256, versions, built)


def _write_and_verify(
    client: MlflowClient,
    settings: RegistrySettings,
    stored: Path,
    what: str,
    manifest_sha256: str,
    versions: Mapping[int, VersionInfo],
    built: Path,
) -> None:
    sources = _sources_from(client, settings, stored, what, versions, ())
    written = write_full_model(sources, (stored / MANIFEST_NAME).read_text(), built, what)
    verify_model_dir(built, manifest_sha256, what, written)


def _own_files(client: MlflowClient, settings: RegistrySettings, info: VersionInfo) -> OwnFiles:
    def own(every_byte: bool) -> Path:
        if every_byte:
            _check_every_byte(client, settings, info)
        return stored_files(client, settings, info)

    return own


def _check_every_byte(client: MlflowClient, settings: RegistrySettings, info: VersionInfo) -> None:
    """`info`'s stored files checked byte for byte: a damaged file in a local store is named; a damaged cached copy
    is dropped, to be fetched again when next read."""
    try:
        stored_files(client, settings, info, every_byte=True)
    except LayerMoEError as damaged:
        if _local_store_folder(client, settings, info) is not None:
            raise
        logger.warning("%s; dropping the cached copy and downloading it again", damaged)
        shutil.rmtree(settings.version_cache(info.version), ignore_errors=True)


def _ancestors(client: MlflowClient, settings: RegistrySettings, stored: Path, versions: Mapping[int, VersionInfo]) -> list[VersionInfo]:
    """The versions whose stored files a rebuild from `stored` reads, as far as their layouts (read where they are) tell."""
    lineage: list[VersionInfo] = []
    layout = stored / LAYOUT_NAME
    while True:
        try:
            parent = None if layout.is_symlink() else json.loads(layout.read_text())["parent"]
        except (OSError, ValueError, KeyError, TypeError):
            parent = None
        if parent is None or parent.get("version") not in versions or versions[parent["version"]] in lineage:
            return lineage
        lineage.append(versions[parent["version"]])
        layout = (_local_store_folder(client, settings, lineage[-1]) or settings.version_cache(lineage[-1].version)) / LAYOUT_NAME


def download_version(settings: RegistrySettings, ref: VersionRef, dest_dir: str | Path) -> LocalVersion:
    """`ref` (an alias such as "champion", or a version number) as a save_pretrained directory in an empty or new `dest_dir`.

    A delta version is rebuilt from its lineage (each version's files cached once). The files land
    in a staging folder next to `dest_dir` and move in only after every one matches the version's
    checksum manifest, so `dest_dir` never holds a partial or corrupt model.
    """
    dest_dir = Path(dest_dir)
    if dest_dir.exists() and (not dest_dir.is_dir() or any(dest_dir.iterdir())):
        raise LayerMoEError(f"dest_dir {dest_dir} is not an empty directory; pass a new or empty folder")
    with store_errors(settings):
        client = open_client(settings, create=False)
        info = find_version(client, settings, ref)
    digest = info.manifest_sha256
    if digest is None:
        raise LayerMoEError(
            f"{_what(info)} has no manifest digest on its run, so its files cannot be verified; "
            "register it with registry.register_base/register_child"
        )
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir.parent, prefix=f".{dest_dir.name}-partial-") as staging:
        with store_errors(settings):
            built = Path(staging) / "model"
            if info.stored_sha256 is not None:
                rebuild_verified(client, settings, _own_files(client, settings, info), _what(info), digest, built)
            else:  # stored whole before delta storage: the artifacts are the model directory
                built = _download_artifacts(client, settings, info, Path(staging))
                verify_model_dir(built, digest, _what(info))
        dest_dir.mkdir(exist_ok=True)
        for entry in built.iterdir():
            shutil.move(entry, dest_dir / entry.name)
    return LocalVersion(path=dest_dir, info=info)


def cached_version(settings: RegistrySettings, ref: VersionRef, cache_dir: str | Path) -> LocalVersion:
    """`ref`'s model in cache_dir/v<N>, reusing an earlier copy that still verifies.

    Versions are immutable, so one local copy serves every round; it is checked against the
    version's manifest on every use, because a killed copy or a full disk can leave it truncated,
    and a copy that fails is downloaded again. The copy is renamed into place whole, so
    concurrent callers never see a partial one.
    """
    with store_errors(settings):
        info = find_version(open_client(settings, create=False), settings, ref)
    dest = Path(cache_dir) / f"v{info.version}"
    if dest.exists() and not _intact(dest, info):
        shutil.rmtree(dest)
    if not dest.exists():
        staging = dest.with_name(f".{dest.name}-{uuid.uuid4().hex[:8]}")
        download_version(settings, info.version, staging)
        try:
            staging.rename(dest)
        except OSError:  # a concurrent caller renamed its verified copy in first
            shutil.rmtree(staging)
    return LocalVersion(path=dest, info=info)


def _intact(copy: Path, info: VersionInfo) -> bool:
    try:
        verify_model_dir(copy, info.manifest_sha256 or "", f"the local copy of version {info.version}")
    except LayerMoEError as e:
        logger.warning("%s; downloading it again", e)
        return False
    return True
