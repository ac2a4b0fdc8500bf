"""Register a model directory as a new version: a run holding its files, manifest and reports, then the version.

Nothing here moves an alias: a version becomes `champion` only through `promote`, after it is READY.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field

from layermoe_core.data.corpus import LanguageCode, validate_language_code
from layermoe_core.errors import LayerMoEError
from layermoe_core.model.files import (
    CONFIG_FILE,
    check_model_files,
    list_model_files,
    parameter_count,
)

from .client import (
    STORE_FAILURES,
    as_registry_error,
    ensure_experiment,
    ensure_registered_model,
    open_client,
    store_errors,
)
from .download import fetch_parent_files
from .failures import RegistryUnavailable
from .manifest import MANIFEST_NAME, build_manifest, sha256_file, text_digest
from .model_card import (
    Verdict,
    base_card,
    child_card,
    drift_record,
    fertility_lines,
    fertility_metrics,
    own_metrics,
    training_metrics,
    verdict_tags,
)
from .pyfunc_model import MLMODEL_FILE, write_mlmodel
from .reports import check_reports, log_metrics_and_params, log_reports
from .settings import RegistrySettings
from .storage import STORED_NAME, ParentFiles, plan_storage, write_stored_manifest
from .tags import (
    ALLOCATION,
    CLASSIFIER_LAYERS,
    KIND,
    LANGUAGES,
    MANIFEST_SHA256,
    PARAMS_ADDED,
    PARAMS_TOTAL,
    PARENT_VERSION,
    ROUND,
    STORAGE,
    STORED_BYTES,
    STORED_SHA256,
    VERDICT,
    encode_tags,
    languages_tag,
)
from .version_info import READY, VersionInfo
from .versions import VersionRef, all_infos, find_version

MODEL_ARTIFACT_DIR = "model"  # the version's source: runs:/<run_id>/model

LogReports = Callable[[MlflowClient, str], None]  # logs a run's reports, given its run id


class RoundInfo(BaseModel):
    """What one expansion round did; checked against the child's config.json before anything is stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=1)
    old_languages: list[LanguageCode] = Field(min_length=1)
    new_languages: list[LanguageCode] = Field(min_length=1)
    allocation: list[int]  # new experts per layer
    classifier_layers: list[int] = []


class PreparedModel(BaseModel):
    """A checked model directory: its file list, manifest text and parameter count."""

    model_config = ConfigDict(frozen=True)

    model_dir: Path
    files: list[str]
    manifest: str
    params_total: int


class Registration(BaseModel):
    """What registering one version writes besides its files: the version's tags and card, and its run's name,
    record params and tags (see registry/tags.py for which fact goes where)."""

    model_config = ConfigDict(frozen=True)

    tags: dict[str, str]
    record: dict[str, str]
    run_tags: dict[str, str] = {}
    run_name: str
    card: str

    def matches(self, info: VersionInfo) -> bool:
        """`info` is this registration done already: READY, with these tags and this record."""
        same_tags = all(info.tags.get(key) == value for key, value in self.tags.items())
        return info.status == READY and same_tags and all(info.record.get(key) == value for key, value in self.record.items())


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
    """The plan's rule (valid codes), and each language once."""
    languages = [validate_language_code(code) for code in languages]
    if not languages or len(set(languages)) != len(languages):
        raise LayerMoEError(f"languages {languages!r} must be distinct language codes, at least one, e.g. ['en', 'zh']")
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


# In the checkpoint folder (hidden, so never part of a model): runs that a failed registration could not
# close because the registry was down. The next registration of the folder marks them FAILED.
UNFINISHED_RUNS_FILE = ".layermoe-unfinished-runs.json"


def _close_unfinished_runs(client: MlflowClient, settings: RegistrySettings, model_dir: Path) -> None:
    marker = model_dir / UNFINISHED_RUNS_FILE
    if not marker.is_file():
        return
    left = []
    for entry in json.loads(marker.read_text()):
        if entry["tracking_uri"] != settings.tracking_uri:
            left.append(entry)
            continue
        try:
            if client.get_run(entry["run_id"]).info.status == "RUNNING":
                client.set_terminated(entry["run_id"], "FAILED")
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":  # deleted meanwhile: nothing to close
                raise
    if left:
        marker.write_text(json.dumps(left))
    else:
        marker.unlink()


def _remember_unfinished_run(settings: RegistrySettings, model_dir: Path, run_id: str) -> None:
    marker = model_dir / UNFINISHED_RUNS_FILE
    entries = json.loads(marker.read_text()) if marker.is_file() else []
    marker.write_text(json.dumps([*entries, {"tracking_uri": settings.tracking_uri, "run_id": run_id}]))


def _register(
    client: MlflowClient,
    settings: RegistrySettings,
    prepared: PreparedModel,
    registration: Registration,
    log_run_reports: LogReports | None = None,
    parent: VersionInfo | None = None,
) -> VersionInfo:
    """Log everything on a new run, then create the version pointing at runs:/<run_id>/model and wait for READY.

    With a `parent` registered with delta storage, only what differs from it is stored. The run stays RUNNING
    until the version exists, so a version whose run is not FINISHED is a registration cut short. A failure
    leaves no RUNNING run behind: the run is marked FAILED, or, when the registry is down, remembered in the
    checkpoint folder and marked FAILED by the retry.
    """
    with tempfile.TemporaryDirectory(prefix="layermoe-register-") as staging:
        try:
            _close_unfinished_runs(client, settings, prepared.model_dir)
            parent_files = fetch_parent_files(client, settings, parent) if parent is not None else None
        except STORE_FAILURES as e:
            raise _registration_error(settings, prepared.model_dir, e) from e
        upload, storage = _stage_files(prepared, Path(staging), settings, parent_files)
        tags = {**registration.tags, STORAGE: storage}
        record = {
            **registration.record,
            **encode_tags({STORED_SHA256: sha256_file(upload[STORED_NAME]), STORED_BYTES: sum(p.stat().st_size for p in upload.values())}),
        }
        try:
            ensure_registered_model(client, settings)
            lineage = {key: value for key, value in tags.items() if key != VERDICT}
            run_id = client.create_run(
                ensure_experiment(client, settings), run_name=registration.run_name, tags={**lineage, **registration.run_tags}
            ).info.run_id
        except STORE_FAILURES as e:
            raise _registration_error(settings, prepared.model_dir, e) from e
        try:
            log_metrics_and_params(client, run_id, {}, record)
            if log_run_reports is not None:
                log_run_reports(client, run_id)
            _upload(client, run_id, upload)
            created = client.create_model_version(
                settings.registered_model_name,
                source=f"runs:/{run_id}/{MODEL_ARTIFACT_DIR}",
                run_id=run_id,
                tags=tags,
                description=registration.card,
                await_creation_for=settings.ready_timeout_s,
            )
            client.set_terminated(run_id, "FINISHED")
        except BaseException as e:  # Ctrl-C too: the run must not stay RUNNING
            try:
                client.set_terminated(run_id, "FAILED")
            except STORE_FAILURES:
                _remember_unfinished_run(settings, prepared.model_dir, run_id)  # the store is gone: the retry closes it
            if isinstance(e, STORE_FAILURES):
                raise _registration_error(settings, prepared.model_dir, e) from e
            raise
    with store_errors(settings, prepared.model_dir):
        return find_version(client, settings, int(created.version))


def _stage_files(
    prepared: PreparedModel, staging: Path, settings: RegistrySettings, parent_files: ParentFiles | None
) -> tuple[dict[str, Path], str]:
    """The version's artifacts (artifact path -> staged file), with its MLmodel and stored-files listing, and its storage."""
    stored = plan_storage(prepared.model_dir, prepared.files, prepared.manifest, staging, parent_files)
    upload = {**stored.files, MLMODEL_FILE: write_mlmodel(staging, settings)}
    upload[STORED_NAME] = write_stored_manifest(upload, staging)
    return upload, stored.storage


def _upload(client: MlflowClient, run_id: str, upload: Mapping[str, Path]) -> None:
    for artifact, local in upload.items():
        if Path(local).name != posixpath.basename(artifact):
            raise LayerMoEError(f"internal: stored file {artifact} staged as {local}")  # log_artifact keeps the local name
        artifact_dir = posixpath.join(MODEL_ARTIFACT_DIR, posixpath.dirname(artifact)).rstrip("/")
        client.log_artifact(run_id, str(local), artifact_dir)


def _register_once(
    client: MlflowClient,
    settings: RegistrySettings,
    prepared: PreparedModel,
    registration: Registration,
    log_run_reports: LogReports | None = None,
    parent: VersionInfo | None = None,
) -> VersionInfo:
    """`_register`, unless a version of this registration exists (the same files, lineage, round and verdict): then
    that version, completed where a registration was killed after creating it. So a rerun never duplicates a
    version; a rerun whose verdict differs (its gate was changed) registers a new one."""
    with store_errors(settings, prepared.model_dir):
        same = [info for info in _versions_if_any(client, settings) if registration.matches(info)]
        if same:
            _close_unfinished_runs(client, settings, prepared.model_dir)
            return _complete(client, settings, same[-1], registration)
    return _register(client, settings, prepared, registration, log_run_reports, parent)


def _versions_if_any(client: MlflowClient, settings: RegistrySettings) -> list[VersionInfo]:
    try:
        return all_infos(client, settings)
    except RegistryUnavailable:
        raise
    except LayerMoEError:  # no registered model yet
        return []


def _complete(client: MlflowClient, settings: RegistrySettings, info: VersionInfo, registration: Registration) -> VersionInfo:
    """What a registration killed after creating `info` left undone: tags and card it lacks, its run FINISHED.
    A complete version is returned as it is (a reviewer's verdict on it stays)."""
    if info.is_complete:
        return info
    for key, value in registration.tags.items():
        if key not in info.tags:
            client.set_model_version_tag(info.name, str(info.version), key, value)
    if not info.description:
        client.update_model_version(info.name, str(info.version), description=registration.card)
    if info.run_id:
        client.set_terminated(info.run_id, "FINISHED")
    return find_version(client, settings, info.version)


def _registration_error(settings: RegistrySettings, model_dir: Path, cause: Exception) -> LayerMoEError:
    """RegistryUnavailable when the registry did not answer (worth a retry), else a LayerMoEError."""
    error = as_registry_error(settings, cause, model_dir)
    if isinstance(error, RegistryUnavailable):
        return error
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
    prepared = prepare_model_dir(model_dir)
    registration = _base_registration(prepared, _check_languages(languages), description, run_name or "base")
    client = open_client(settings, checkpoint=prepared.model_dir)
    return _register(client, settings, prepared, registration)


def _base_registration(prepared: PreparedModel, languages: list[str], description: str | None, run_name: str) -> Registration:
    return Registration(
        tags=encode_tags({KIND: "base", ROUND: 0, LANGUAGES: languages_tag(languages), VERDICT: "base"}),
        record=encode_tags({PARAMS_TOTAL: prepared.params_total, MANIFEST_SHA256: text_digest(prepared.manifest)}),
        run_name=run_name,
        card=base_card(languages, prepared.params_total, description),
    )


def find_or_register_base(settings: RegistrySettings, model_dir: str | Path, languages: list[str]) -> VersionInfo:
    """The READY base version holding exactly these files and languages, registered now only if there is none.

    Rerunning a first round then reuses its base (and so its round folder) instead of adding a version.
    """
    prepared = prepare_model_dir(model_dir)
    client = open_client(settings, checkpoint=prepared.model_dir)
    return _register_once(client, settings, prepared, _base_registration(prepared, _check_languages(languages), None, "base"))


def register_child(
    settings: RegistrySettings,
    model_dir: str | Path,
    parent_version: VersionRef,
    round_info: RoundInfo,
    tables: Mapping[str, pd.DataFrame],
    plots: Mapping[str, Path],
    metrics: Mapping[str, float],
    params: Mapping[str, object],
    description: str | None = None,
    run_name: str | None = None,
    comparison: pd.DataFrame | None = None,
    verdict: Verdict | None = None,
    training_history: Mapping[str, Sequence[Mapping[str, object]]] = {},
    classifier_accuracy: pd.DataFrame | None = None,
) -> VersionInfo:
    """Register an expanded child of `parent_version`: lineage tags, model card, reports, metrics, params.

    `comparison` (evaluation.compare_models) becomes the card's per-language table and the run's
    `<metric>.<language>` metrics; its parent column is also logged on the parent's run for keys that run
    lacks (so the base gets its held-out metrics). `verdict` is tagged and shown on the card;
    `training_history` maps a stage to its Trainer log rows, logged as curves (`train/stage1/loss`).
    `classifier_accuracy` (layer, language, accuracy, target) is a table and a card column. Nested `params` are flattened.
    """
    check_reports(tables, plots)
    prepared = prepare_model_dir(model_dir)
    _check_round_matches_config(prepared.model_dir, round_info)
    client = open_client(settings, checkpoint=prepared.model_dir)
    with store_errors(settings, prepared.model_dir):
        parent = find_version(client, settings, parent_version)
    registration = _child_registration(
        settings, prepared, parent, round_info, comparison, verdict, classifier_accuracy, tables.get("fertility"), description, run_name
    )
    curves, one_offs = training_metrics(training_history)
    fertility = tables.get("fertility")
    all_metrics = {
        **(own_metrics(comparison, "child") if comparison is not None else {}),
        **(fertility_metrics(fertility) if fertility is not None else {}),
        **metrics,
    }
    if classifier_accuracy is not None:
        tables = {**tables, "classifier_accuracy": classifier_accuracy}

    def log_run_reports(run_client: MlflowClient, run_id: str) -> None:
        log_reports(run_client, run_id, tables, plots, all_metrics, {**params, **one_offs}, curves)
        if comparison is not None and parent.run_id:
            _backfill_parent_metrics(run_client, parent.run_id, own_metrics(comparison, "parent"))

    return _register_once(client, settings, prepared, registration, log_run_reports, parent if settings.delta_storage else None)


def _child_registration(
    settings: RegistrySettings,
    prepared: PreparedModel,
    parent: VersionInfo,
    round_info: RoundInfo,
    comparison: pd.DataFrame | None,
    verdict: Verdict | None,
    classifier_accuracy: pd.DataFrame | None,
    fertility: pd.DataFrame | None,
    description: str | None,
    run_name: str | None,
) -> Registration:
    """The child's tags, record and card, once its round is checked to follow its parent's."""
    parent_round = parent.tag(ROUND)
    if parent_round is None or round_info.round != parent_round + 1:
        raise LayerMoEError(
            f"round_info round {round_info.round} does not follow parent version {parent.version} (round {parent_round}); "
            f"pass round {None if parent_round is None else parent_round + 1} or the right parent"
        )
    params_added = prepared.params_total - parent.params_total if parent.params_total is not None else None
    card = child_card(
        settings.registered_model_name,
        round_info.round,
        parent.version,
        parent_round,
        round_info.old_languages,
        round_info.new_languages,
        round_info.allocation,
        round_info.classifier_layers,
        comparison,
        verdict,
        params_added,
        classifier_accuracy,
    )
    if fertility is not None:
        card += "\n" + "\n".join(fertility_lines(fertility))
    return Registration(
        tags=encode_tags(
            {
                KIND: "child",
                ROUND: round_info.round,
                LANGUAGES: languages_tag(round_info.old_languages, round_info.new_languages),
                PARENT_VERSION: parent.version,
                **({VERDICT: verdict.tag} if verdict is not None else {}),
            }
        ),
        record=encode_tags(
            {
                ALLOCATION: round_info.allocation,
                CLASSIFIER_LAYERS: round_info.classifier_layers,
                PARAMS_TOTAL: prepared.params_total,
                **({PARAMS_ADDED: params_added} if params_added is not None else {}),
                MANIFEST_SHA256: text_digest(prepared.manifest),
                **(drift_record(comparison) if comparison is not None else {}),
            }
        ),
        run_tags=verdict_tags(verdict) if verdict is not None else {},
        run_name=run_name or f"round-{round_info.round}-{'-'.join(round_info.new_languages)}",
        card=card + ("\n\n" + description if description else ""),
    )


def _backfill_parent_metrics(client: MlflowClient, parent_run_id: str, metrics: Mapping[str, float]) -> None:
    """The parent's held-out values measured by this round, for the keys its run does not have yet."""
    existing = client.get_run(parent_run_id).data.metrics
    missing = {key: value for key, value in metrics.items() if key not in existing}
    if missing:
        log_metrics_and_params(client, parent_run_id, missing)
