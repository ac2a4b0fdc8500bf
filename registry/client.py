"""Open an `MlflowClient` on the settings' store, failing fast and clearly when it is unreachable."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from layermoe_core.errors import LayerMoEError

from .settings import RegistrySettings

REGISTERED_MODEL_DESCRIPTION = (
    "LayerMoE lifelong language expansion. Each version is a save_pretrained directory; "
    "its layermoe.* tags give languages, lineage (layermoe.parent_version), allocation and sizes."
)


def unreachable_error(settings: RegistrySettings, cause: Exception, checkpoint: Path | None) -> LayerMoEError:
    kept = (
        f"; the checkpoint is still at {checkpoint}, so a retry can register it without retraining"
        if checkpoint is not None
        else ""
    )
    return LayerMoEError(
        f"the MLflow registry at {settings.tracking_uri} is unreachable ({cause}){kept}. "
        "Start the tracking server or point MLFLOW_TRACKING_URI / RegistrySettings.tracking_uri at a reachable one."
    )


def _probe_http(settings: RegistrySettings) -> None:
    """One short request without retries: MLflow's own defaults retry for minutes on a dead server."""
    http_request(
        get_default_host_creds(settings.tracking_uri),
        "/api/2.0/mlflow/experiments/get-by-name",
        "GET",
        max_retries=0,
        timeout=settings.connect_timeout_s,
        params={"experiment_name": settings.experiment_name},
    )  # any HTTP answer, 404 included, means the server is up


def open_client(settings: RegistrySettings, checkpoint: Path | None = None) -> MlflowClient:
    """An `MlflowClient` whose store answered; `checkpoint` is named in the error if it did not."""
    if settings.sqlite_path is not None:
        settings.sqlite_path.parent.mkdir(parents=True, exist_ok=True)  # sqlite creates files, not folders
    if settings.is_http:
        try:
            _probe_http(settings)
        except MlflowException as e:
            raise unreachable_error(settings, e, checkpoint) from e
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def ensure_experiment(client: MlflowClient, settings: RegistrySettings) -> str:
    """The experiment's id, creating it (with the settings' artifact location) on first use."""
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(
            settings.experiment_name, artifact_location=settings.experiment_artifact_location()
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it meanwhile
            raise
        return client.get_experiment_by_name(settings.experiment_name).experiment_id


def ensure_registered_model(client: MlflowClient, settings: RegistrySettings) -> None:
    try:
        client.get_registered_model(settings.registered_model_name)
        return
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(settings.registered_model_name, description=REGISTERED_MODEL_DESCRIPTION)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it meanwhile
            raise
