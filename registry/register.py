"""Register a model directory as a new version: a run holding its files, manifest and reports, then the version.

Nothing here moves an alias: a version becomes `champion` only through `promote`, after it is READY.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layermoe_core.errors import LayerMoEError

from .client import ensure_experiment, ensure_registered_model, open_client
from .manifest import MANIFEST_NAME, build_manifest, text_digest
from .model_files import CONFIG_FILE, check_model_files, list_model_files, parameter_count
from .reports import check_reports, log_reports
from .settings import RegistrySettings
from .tags import (
    ALLOCATION,
    CLASSIFIER_LAYERS,
    KIND,
    LANGUAGES,
    MANIFEST_SHA256,
    NEW_LANGUAGES,
    OLD_LANGUAGES,
    PARAMS_ADDED,
    PARAMS_TOTAL,
    PARENT_VERSION,
    ROUND,
    encode_tags,
)
from .versions import VersionInfo, VersionRef, find_version

MODEL_ARTIFACT_DIR = "model"  # the version's source: runs:/<run_id>/model

LogReports = Callable[[MlflowClient, str], None]  # logs a run's reports, given its run id


class RoundInfo(BaseModel):
    """What one expansion round did; checked against the child's config.json before anything is stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=1)
    old_languages: list[str] = Field(min_length=1)
    new_languages: list[str] = Field(min_length=1)
    allocation: list[int]  # new experts per layer
    classifier_layers: list[int] = []


class PreparedModel(BaseModel):
    """A checked model directory: its file list, manifest text and parameter count."""

    model_config = ConfigDict(frozen=True)

    model_dir: Path
    files: list[str]
    manifest: str
    params_total: int


def prepare_model_dir(model_dir: str | Path) -> PreparedModel:
    """Refuse a directory that is not a safe save_pretrained output before touching the registry."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LayerMoEError(f"model_dir {model_dir} is not a directory; pass the folder written by save_pretrained")
    files = list_model_files(model_dir, exclude=(MANIFEST_NAME,))
    check_model_files(files, str(model_dir))
    return PreparedModel(
        model_dir=model_dir, files=files, manifest=build_manifest(model_dir, files), params_total=parameter_count(model_dir, files)
    )


def _check_languages(languages: list[str]) -> list[str]:
    languages = list(languages)
    if not languages or not all(isinstance(code, str) and code for code in languages) or len(set(languages)) != len(languages):
        raise LayerMoEError(f"languages {languages!r} must be distinct non-empty codes, e.g. ['en', 'zh']")
    return languages


def _check_round_matches_config(model_dir: Path, round_info: RoundInfo) -> None:
    """The tags must describe the weights: compare round_info with the round the config records."""
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    rounds = config.get("expansion_rounds") or []
    if config.get("model_type") != "layermoe" or not rounds:
        raise LayerMoEError(
            f"{model_dir} holds a {config.get('model_type')!r} model with no expansion round; "
            "pass the save_pretrained directory of the expanded (layermoe) child"
        )
    recorded = {key: rounds[-1].get(key, []) for key in ("old_languages", "new_languages", "allocation", "classifier_layers")}
    given = round_info.model_dump(exclude={"round"})
    if recorded != given:
        raise LayerMoEError(f"round_info {given} does not match the newest round in {model_dir / CONFIG_FILE}: {recorded}")


def _register(
    client: MlflowClient,
    settings: RegistrySettings,
    prepared: PreparedModel,
    version_tags: dict[str, str],
    run_name: str,
    description: str,
    log_run_reports: LogReports | None = None,
) -> VersionInfo:
    """Log everything on a new run, then create the version pointing at runs:/<run_id>/model and wait for READY."""
    name = settings.registered_model_name
    try:
        ensure_registered_model(client, settings)
        run_id = client.create_run(ensure_experiment(client, settings), run_name=run_name, tags=version_tags).info.run_id
    except (MlflowException, OSError) as e:
        raise _registration_error(settings, prepared.model_dir, e) from e
    try:
        if log_run_reports is not None:
            log_run_reports(client, run_id)
        for file in prepared.files:
            artifact_dir = posixpath.join(MODEL_ARTIFACT_DIR, posixpath.dirname(file)).rstrip("/")
            client.log_artifact(run_id, str(prepared.model_dir / file), artifact_dir)
        client.log_text(run_id, prepared.manifest, f"{MODEL_ARTIFACT_DIR}/{MANIFEST_NAME}")
        created = client.create_model_version(
            name,
            source=f"runs:/{run_id}/{MODEL_ARTIFACT_DIR}",
            run_id=run_id,
            tags=version_tags,
            description=description,
            await_creation_for=settings.ready_timeout_s,
        )
        client.set_terminated(run_id, "FINISHED")
    except (MlflowException, OSError) as e:
        try:
            client.set_terminated(run_id, "FAILED")
        except (MlflowException, OSError):
            pass  # the store is gone; the error below is what matters
        raise _registration_error(settings, prepared.model_dir, e) from e
    return find_version(client, settings, int(created.version))


def _registration_error(settings: RegistrySettings, model_dir: Path, cause: Exception) -> LayerMoEError:
    return LayerMoEError(
        f"registering {model_dir} in the MLflow registry at {settings.tracking_uri} failed ({cause}); "
        f"the checkpoint is still at {model_dir}, so once the registry works a retry registers it without retraining"
    )


def register_base(
    settings: RegistrySettings,
    model_dir: str | Path,
    languages: list[str],
    description: str | None = None,
    run_name: str | None = None,
) -> VersionInfo:
    """Register a dense base model (built here, or an HF checkpoint downloaded into `model_dir`) as round 0."""
    languages = _check_languages(languages)
    prepared = prepare_model_dir(model_dir)
    version_tags = encode_tags({
        KIND: "base",
        ROUND: 0,
        LANGUAGES: languages,
        PARAMS_TOTAL: prepared.params_total,
        MANIFEST_SHA256: text_digest(prepared.manifest),
    })
    client = open_client(settings, checkpoint=prepared.model_dir)
    description = description or f"Base model for {', '.join(languages)}."
    return _register(client, settings, prepared, version_tags, run_name or "base", description)


def register_child(
    settings: RegistrySettings,
    model_dir: str | Path,
    parent_version: VersionRef,
    round_info: Mapping[str, object],
    tables: Mapping[str, pd.DataFrame],
    plots: Mapping[str, Path],
    metrics: Mapping[str, float],
    params: Mapping[str, object],
    description: str | None = None,
    run_name: str | None = None,
) -> VersionInfo:
    """Register an expanded child of `parent_version` with its lineage tags, tables, plots, metrics and params."""
    try:
        round_ = RoundInfo.model_validate(dict(round_info))
    except ValidationError as e:
        raise LayerMoEError(f"round_info is invalid; fix these fields: {e}") from e
    check_reports(tables, plots)
    prepared = prepare_model_dir(model_dir)
    _check_round_matches_config(prepared.model_dir, round_)
    client = open_client(settings, checkpoint=prepared.model_dir)
    parent = find_version(client, settings, parent_version)
    parent_round = parent.tag(ROUND)
    if parent_round is None or round_.round != parent_round + 1:
        raise LayerMoEError(
            f"round_info round {round_.round} does not follow parent version {parent.version} (round {parent_round}); "
            f"pass round {None if parent_round is None else parent_round + 1} or the right parent"
        )
    parent_params = parent.tag(PARAMS_TOTAL)
    version_tags = encode_tags({
        KIND: "child",
        PARENT_VERSION: parent.version,
        ROUND: round_.round,
        OLD_LANGUAGES: round_.old_languages,
        NEW_LANGUAGES: round_.new_languages,
        LANGUAGES: round_.old_languages + round_.new_languages,
        ALLOCATION: round_.allocation,
        CLASSIFIER_LAYERS: round_.classifier_layers,
        PARAMS_TOTAL: prepared.params_total,
        **({PARAMS_ADDED: prepared.params_total - parent_params} if parent_params is not None else {}),
        MANIFEST_SHA256: text_digest(prepared.manifest),
    })
    description = description or (
        f"Round {round_.round}: adds {', '.join(round_.new_languages)} to version {parent.version} "
        f"({', '.join(round_.old_languages)})."
    )
    run_name = run_name or f"round-{round_.round}-{'-'.join(round_.new_languages)}"
    return _register(
        client, settings, prepared, version_tags, run_name, description,
        lambda run_client, run_id: log_reports(run_client, run_id, tables, plots, metrics, params),
    )
