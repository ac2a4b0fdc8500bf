"""Fetch a version's model directory and verify it file by file before anyone loads it."""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from pathlib import Path

import mlflow.artifacts
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict

from layermoe_core.errors import LayerMoEError

from .client import open_client, store_errors
from .manifest import verify_model_dir
from .settings import RegistrySettings
from .tags import MANIFEST_SHA256
from .versions import VersionInfo, VersionRef, find_version

logger = logging.getLogger(__name__)


class LocalVersion(BaseModel):
    """A verified local copy of a version: load it with AutoModelForCausalLM.from_pretrained(path)."""

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


def download_version(settings: RegistrySettings, ref: VersionRef, dest_dir: str | Path) -> LocalVersion:
    """Download `ref` (an alias such as "champion", or a version number) into an empty or new `dest_dir`.

    The files land in a staging folder next to `dest_dir` and move in only after verification,
    so `dest_dir` never holds a partial or corrupt model.
    """
    dest_dir = Path(dest_dir)
    if dest_dir.exists() and (not dest_dir.is_dir() or any(dest_dir.iterdir())):
        raise LayerMoEError(f"dest_dir {dest_dir} is not an empty directory; pass a new or empty folder")
    with store_errors(settings):
        client = open_client(settings, create=False)
        info = find_version(client, settings, ref)
    what = f"version {info.version} of {info.name!r}"
    digest = info.tags.get(MANIFEST_SHA256)
    if digest is None:
        raise LayerMoEError(f"{what} has no {MANIFEST_SHA256} tag, so its files cannot be verified; register it with registry.register_base/register_child")
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir.parent, prefix=f".{dest_dir.name}-partial-") as staging:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=client.get_model_version_download_uri(info.name, str(info.version)),
                dst_path=staging,
                tracking_uri=settings.tracking_uri,
                registry_uri=settings.tracking_uri,
            )
        except (MlflowException, OSError) as e:
            raise LayerMoEError(f"downloading {what} from {settings.tracking_uri} failed ({e}); check the artifact store, then retry") from e
        verify_model_dir(Path(local), digest, what)
        dest_dir.mkdir(exist_ok=True)
        for entry in Path(local).iterdir():
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
