"""`RegistrySettings`: where the MLflow registry lives and what the project's entries are called."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
# MLflow's own file store is refused in this project; these back ends take runs and the registry.
SUPPORTED_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql")
# Safe inside MLflow filter strings and artifact paths.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _tracking_uri_from_env() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _cache_dir_from_env() -> Path:
    return Path(os.environ.get("LAYERMOE_REGISTRY_CACHE") or "~/.cache/layermoe/registry").expanduser()


class RegistrySettings(BaseModel):
    """The MLflow store that holds the versions. The defaults run with no server: a sqlite file and artifacts under ./mlruns."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="Registry")

    tracking_uri: str = Field(
        default_factory=_tracking_uri_from_env,
        title="Tracking URI",
        description="MLflow tracking and registry URI: sqlite:///path.db, http(s)://server, or a database URI.",
    )
    registered_model_name: str = Field(
        "layermoe", title="Registered model", description="The registered model whose versions the rounds add."
    )
    experiment_name: str = Field("layermoe", title="Experiment", description="The MLflow experiment that holds each round's run.")
    artifact_location: str | None = Field(
        default=None,
        title="Artifact location",
        description="Artifact root of a new experiment. Empty: an `artifacts` folder beside the sqlite file, or the server's default.",
    )
    connect_timeout_s: float = Field(
        default=5.0, gt=0, title="Connect timeout (s)", description="How long the first probe waits for an http(s) server."
    )
    request_timeout_s: float = Field(
        default=15.0,
        gt=0,
        title="Request timeout (s)",
        description="Per HTTP request to an http(s) server: connect, and each wait for an answer.",
    )
    request_retries: int = Field(
        default=2,
        ge=0,
        le=10,
        title="Request retries",
        description="Retries of a failed HTTP request (MLflow's own default, 7, waits for minutes).",
    )
    retry_backoff_s: int = Field(
        default=1, ge=0, le=30, title="Retry backoff (s)", description="Retry n waits retry_backoff_s * 2**(n-1) seconds."
    )
    ready_timeout_s: int = Field(
        default=300, gt=0, title="Ready timeout (s)", description="How long to wait for a new version to be READY."
    )
    delta_storage: bool = Field(
        default=True,
        title="Delta storage",
        description="Store a child as the tensors and files its round changed; False stores every version whole.",
    )
    cache_dir: Path = Field(
        default_factory=_cache_dir_from_env,
        title="Download cache",
        description="Each version's stored files, downloaded once (versions are immutable). Default $LAYERMOE_REGISTRY_CACHE "
        "or ~/.cache/layermoe/registry.",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _supported_store(cls, uri: str) -> str:
        scheme = urlparse(uri).scheme.split("+")[0]
        if scheme not in SUPPORTED_SCHEMES:
            raise ValueError(
                f"tracking_uri {uri!r} is not a supported MLflow store ({', '.join(SUPPORTED_SCHEMES)}); "
                f"MLflow's file store is refused: use e.g. {DEFAULT_TRACKING_URI} or http://host:5000"
            )
        if scheme == "sqlite" and not uri.startswith("sqlite:///"):
            raise ValueError(f"tracking_uri {uri!r} names no database file; use sqlite:///path/to/mlflow.db")
        return uri

    @field_validator("registered_model_name", "experiment_name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"name {name!r} must be letters, digits, '_', '.' or '-' (e.g. 'layermoe')")
        return name

    def worst_case_wait_s(self) -> float:
        """The longest one HTTP request can take before the registry is declared unavailable."""
        attempts = self.request_retries + 1
        backoff = sum(self.retry_backoff_s * 2 ** (n - 1) for n in range(1, attempts))
        return attempts * self.request_timeout_s + backoff

    def version_cache(self, version: int) -> Path:
        """This store's cache folder of one version's stored files."""
        store = hashlib.sha256(self.tracking_uri.encode()).hexdigest()[:16]
        return self.cache_dir / store / self.registered_model_name / f"v{version}"

    @property
    def is_http(self) -> bool:
        return urlparse(self.tracking_uri).scheme in ("http", "https")

    @property
    def sqlite_path(self) -> Path | None:
        """The database file of a sqlite URI (relative paths are relative to the working directory)."""
        if not self.tracking_uri.startswith("sqlite:///"):
            return None
        return Path(self.tracking_uri.removeprefix("sqlite:///").split("?")[0])

    def experiment_artifact_location(self) -> str | None:
        """Keep a local store's artifacts beside its database, so one folder holds the whole registry."""
        if self.artifact_location is not None:
            return self.artifact_location
        if self.sqlite_path is not None:
            return (self.sqlite_path.resolve().parent / "artifacts").as_uri()
        return None
