"""Resolve the parent of a round: a registry version, downloaded and verified locally."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from pydantic import BaseModel

from layermoe_core.checkpoints import check_model_dir
from layermoe_core.errors import LayerMoEError
from registry.download import download_version
from registry.register import register_base
from registry.settings import RegistrySettings
from registry.versions import promote, show_version


class ParentModel(BaseModel):
    """The local copy of a parent version and what the registry says about it."""

    path: Path
    version: int
    round: int
    languages: list[str]


@task(name="register base", retries=2, retry_delay_seconds=5)
def register_base_model(registry: RegistrySettings, hf_path: Path, languages: list[str], alias: str) -> int:
    """A dense model directory (an HF checkpoint, or the demo base) becomes a round-0 version holding `alias`."""
    if not languages:
        raise LayerMoEError("an hf_path parent needs the languages it already knows: set old_languages in the plan")
    check_model_dir(hf_path)
    version = register_base(registry, hf_path, languages).version
    promote(registry, version, alias)
    return version


@task(name="resolve parent", retries=2, retry_delay_seconds=5)
def resolve_parent(registry: RegistrySettings, ref: int | str, downloads_dir: Path) -> ParentModel:
    """Download version `ref` (alias or number) into downloads_dir/v<N>, reusing a verified earlier download.

    Registry versions are immutable, so one local copy per version serves every round.
    """
    info = show_version(registry, ref)
    dest = downloads_dir / f"v{info['version']}"
    if not (dest / "config.json").is_file():
        download_version(registry, info["version"], dest)
    parent = ParentModel(path=dest, version=info["version"], round=info.get("round") or 0, languages=info.get("languages") or [])
    get_run_logger().info("parent: version %s (round %s, languages %s) at %s", parent.version, parent.round, parent.languages, dest)
    return parent
