"""Open an `MlflowClient` on the settings' store, failing fast and clearly when it is unreachable or not MLflow."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from layermoe_core.errors import LayerMoEError

from .failures import (
    no_store_error,
    not_mlflow_error,
    refused_error,
    unavailable_error,
)
from .settings import RegistrySettings

REGISTERED_MODEL_DESCRIPTION = (  # markdown in the UI: a bare <name> would vanish as an HTML tag, so the name is filled in
    "LayerMoE lifelong language expansion. Each version's description is its model card (languages, parent, "
    "allocation, per-language metrics, gate verdict); its `layermoe.*` tags give lineage and sizes. Load a version "
    'with `mlflow.pyfunc.load_model("models:/{name}@champion")` or `registry.download_version`.'
)

# MLflow error codes that mean "the registry did not answer", not "the request was wrong".
TRANSIENT_ERROR_CODES = frozenset(
    {
        "INTERNAL_ERROR",
        "TEMPORARILY_UNAVAILABLE",
        "IO_ERROR",
        "SERVICE_UNDER_MAINTENANCE",
        "DEADLINE_EXCEEDED",
        "REQUEST_LIMIT_EXCEEDED",
        "RESOURCE_EXHAUSTED",
    }
)


STORE_FAILURES = (MlflowException, requests.RequestException, OSError)


def as_registry_error(settings: RegistrySettings, error: Exception, checkpoint: Path | None = None) -> LayerMoEError:
    """`RegistryUnavailable` when the store did not answer (a retry can succeed), else a `LayerMoEError` (refused)."""
    if isinstance(error, MlflowException) and error.error_code not in TRANSIENT_ERROR_CODES:
        return refused_error(settings, error.message)
    return unavailable_error(settings, error, checkpoint)


@contextmanager
def store_errors(settings: RegistrySettings, checkpoint: Path | None = None) -> Iterator[None]:
    """Raise MLflow and network failures as `RegistryUnavailable` or `LayerMoEError`, never raw."""
    try:
        yield
    except STORE_FAILURES as e:
        if isinstance(e, LayerMoEError):
            raise
        raise as_registry_error(settings, e, checkpoint) from e


def _apply_http_limits(settings: RegistrySettings) -> None:
    """MLflow reads its HTTP retry and timeout settings from the environment on every request."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(settings.request_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(settings.retry_backoff_s)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(max(1, round(settings.request_timeout_s))))


def _probe_http(settings: RegistrySettings, checkpoint: Path | None) -> None:
    """One short request without retries, which must get an MLflow answer (a 404 for an unknown name is one)."""
    try:
        response = http_request(
            get_default_host_creds(settings.tracking_uri),
            "/api/2.0/mlflow/experiments/get-by-name",
            "GET",
            max_retries=0,
            timeout=settings.connect_timeout_s,
            raise_on_status=False,
            params={"experiment_name": settings.experiment_name},
        )
    except (MlflowException, requests.RequestException, OSError) as e:
        raise unavailable_error(settings, e, checkpoint) from e
    if response.status_code >= 500:
        raise unavailable_error(settings, RuntimeError(f"HTTP {response.status_code}"), checkpoint)
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not ("experiment" in body or "error_code" in body):
        raise not_mlflow_error(settings, response.status_code, response.headers.get("Content-Type"))


def open_client(settings: RegistrySettings, checkpoint: Path | None = None, create: bool = True) -> MlflowClient:
    """An `MlflowClient` whose store answered; `checkpoint` is named in the error if it did not.

    With create=False (browsing) a sqlite store that does not exist is an error instead of a new empty database.
    """
    sqlite_path = settings.sqlite_path
    if sqlite_path is not None:
        if not create and not sqlite_path.is_file():
            raise no_store_error(settings, sqlite_path)
        sqlite_path.parent.mkdir(parents=True, exist_ok=True)  # sqlite creates files, not folders
        return _open_sqlite_store(settings, sqlite_path)
    if settings.is_http:
        _apply_http_limits(settings)
        _probe_http(settings, checkpoint)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def _open_sqlite_store(settings: RegistrySettings, sqlite_path: Path) -> MlflowClient:
    """A client on the sqlite store, its tables created (or upgraded) by one process at a time.

    MLflow creates a new store's tables (alembic migrations) when a process first opens it; two commands
    doing that at once on one file collide ("Online migration expected to match one row"). Each process
    opens the store under an exclusive lock on `.<name>.lock` beside it, so the second waits, then finds it
    made. (The lock is `fcntl.flock`; where that is missing, as on Windows, stores are opened unlocked.)
    """
    try:
        import fcntl
    except ImportError:
        return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    with open(sqlite_path.with_name(f".{sqlite_path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:  # the client opens the tracking store, its first registry call the registry store: each creates its tables
            client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
            client.search_registered_models(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


def ensure_experiment(client: MlflowClient, settings: RegistrySettings) -> str:
    """The experiment's id, creating it (with the settings' artifact location) on first use."""
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(settings.experiment_name, artifact_location=settings.experiment_artifact_location())
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
        client.create_registered_model(
            settings.registered_model_name, description=REGISTERED_MODEL_DESCRIPTION.format(name=settings.registered_model_name)
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it meanwhile
            raise
