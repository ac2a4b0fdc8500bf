"""Resolve the parent of a round: a registry version, downloaded and verified locally."""

import json
import shutil
import uuid
from pathlib import Path

from prefect import get_run_logger, task
from pydantic import BaseModel

from layermoe_core.checkpoints import check_model_dir
from layermoe_core.configuration_layermoe import SUPPORTED_BASE_MODEL_TYPES
from layermoe_core.data import validate_language_code
from layermoe_core.errors import LayerMoEError
from registry.download import download_version
from registry.manifest import verify_model_dir
from registry.register import register_base
from registry.settings import RegistrySettings
from registry.versions import promote, show_version

from .common import REGISTRY_RETRY_DELAYS_S, registry_unreachable


class ParentModel(BaseModel):
    """The local copy of a parent version and what the registry says about it."""

    path: Path
    version: int
    round: int
    languages: list[str]


def check_expandable(model_dir: Path) -> None:
    """Refuse a model the surgery cannot expand before anything is registered or trained (config.json alone)."""
    model_type = json.loads((check_model_dir(model_dir) / "config.json").read_text()).get("model_type")
    if model_type != "layermoe" and model_type not in SUPPORTED_BASE_MODEL_TYPES:
        raise LayerMoEError(
            f"unsupported base architecture {model_type!r} in {model_dir}: layermoe expands "
            f"{', '.join(SUPPORTED_BASE_MODEL_TYPES)} models (decoder layers with a gated MLP); "
            "convert the model to one of these families or pick another parent"
        )


@task(name="register base", retries=2, retry_delay_seconds=REGISTRY_RETRY_DELAYS_S, retry_condition_fn=registry_unreachable)
def register_base_model(registry: RegistrySettings, hf_path: Path, languages: list[str], alias: str) -> int:
    """A dense model directory (an HF checkpoint, or the demo base) becomes a round-0 version holding `alias`."""
    if not languages:
        raise LayerMoEError("an hf_path parent needs the languages it already knows: set old_languages in the plan")
    for code in languages:
        validate_language_code(code)
    check_expandable(hf_path)
    version = register_base(registry, hf_path, languages).version
    promote(registry, version, alias)
    return version


@task(name="resolve parent", retries=2, retry_delay_seconds=REGISTRY_RETRY_DELAYS_S, retry_condition_fn=registry_unreachable)
def resolve_parent(registry: RegistrySettings, ref: int | str, downloads_dir: Path) -> ParentModel:
    """Download version `ref` (alias or number) into downloads_dir/v<N>, reusing an earlier download that still verifies.

    Registry versions are immutable, so one local copy per version serves every round; it is
    checked against the version's manifest on every use, because a killed copy or a full disk
    can leave it truncated, and a copy that fails is downloaded again.
    """
    info = show_version(registry, ref)
    dest = downloads_dir / f"v{info['version']}"
    if dest.exists() and not _intact(dest, info):
        shutil.rmtree(dest)
    if not dest.exists():
        _download_into_place(registry, info["version"], dest)
    check_expandable(dest)
    parent = ParentModel(path=dest, version=info["version"], round=info.get("round") or 0, languages=info.get("languages") or [])
    get_run_logger().info("parent: version %s (round %s, languages %s) at %s", parent.version, parent.round, parent.languages, dest)
    return parent


def _intact(copy: Path, info: dict) -> bool:
    try:
        verify_model_dir(copy, info.get("manifest_sha256") or "", f"the local copy of version {info['version']}")
    except LayerMoEError as e:
        get_run_logger().warning("%s; downloading it again", e)
        return False
    return True


def _download_into_place(registry: RegistrySettings, version: int, dest: Path) -> None:
    """Download beside `dest`, then rename the whole folder in: concurrent rounds never see a partial copy."""
    staging = dest.with_name(f".{dest.name}-{uuid.uuid4().hex[:8]}")
    download_version(registry, version, staging)
    try:
        staging.rename(dest)
    except OSError:  # a concurrent round renamed its verified copy in first
        shutil.rmtree(staging)
