"""Resolve the parent of a round: a registry version, downloaded and verified locally."""

from pathlib import Path

from prefect import get_run_logger, task
from pydantic import BaseModel
from transformers import AutoConfig

from layermoe_core.data.corpus import validate_language_code
from layermoe_core.errors import LayerMoEError
from layermoe_core.model import modeling_layermoe  # noqa: F401  (registers the layermoe config with AutoConfig)
from layermoe_core.model.configuration_layermoe import check_supported_config
from layermoe_core.model.files import check_model_dir
from registry import RegistrySettings, alias_version, cached_version, find_or_register_base, promote

from .common import REGISTRY_RETRY_DELAYS_S, registry_unreachable


class ParentModel(BaseModel):
    """The local copy of a parent version and what the registry says about it."""

    path: Path
    version: int
    round: int
    languages: list[str]


def check_expandable(model_dir: Path) -> None:
    """Refuse a model the surgery cannot expand before anything is registered or trained (config.json alone)."""
    check_supported_config(AutoConfig.from_pretrained(check_model_dir(model_dir), trust_remote_code=False), str(model_dir))


@task(name="register base", retries=2, retry_delay_seconds=REGISTRY_RETRY_DELAYS_S, retry_condition_fn=registry_unreachable)
def register_base_model(registry: RegistrySettings, hf_path: Path, languages: list[str], alias: str | None) -> int:
    """A dense model directory (an HF checkpoint, or the demo base) as a round-0 version.

    A base already registered with the same files and languages is reused. `alias` is set on the
    base only where it is not set yet: an existing alias never moves back onto a base.
    """
    if not languages:
        raise LayerMoEError("an hf_path parent needs the languages it already knows: set old_languages in the plan")
    for code in languages:
        validate_language_code(code)
    check_expandable(hf_path)
    version = find_or_register_base(registry, hf_path, languages).version
    if alias is not None:
        holder = alias_version(registry, alias)
        if holder is None:
            promote(registry, version, alias)
        elif holder != version:
            get_run_logger().info("alias %r stays on version %s; the base is version %s", alias, holder, version)
    return version


@task(name="resolve parent", retries=2, retry_delay_seconds=REGISTRY_RETRY_DELAYS_S, retry_condition_fn=registry_unreachable)
def resolve_parent(registry: RegistrySettings, ref: int | str, downloads_dir: Path) -> ParentModel:
    """Version `ref` (alias or number), verified, in downloads_dir/v<N> (the registry's local-copy cache)."""
    local = cached_version(registry, ref, downloads_dir)
    check_expandable(local.path)
    parent = ParentModel(path=local.path, version=local.version, round=local.info.round, languages=local.info.languages)
    get_run_logger().info("parent: version %s (round %s, languages %s) at %s", parent.version, parent.round, parent.languages, local.path)
    return parent
