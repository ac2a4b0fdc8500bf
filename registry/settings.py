"""`RegistrySettings`: where the MLflow registry lives and what the project's entries are called."""

from __future__ import annotations

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


class RegistrySettings(BaseModel):
    """The defaults run with no server: a sqlite file and artifacts under ./mlruns."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tracking_uri: str = Field(
        default_factory=_tracking_uri_from_env,
        description="MLflow tracking and registry URI: sqlite:///path.db, http(s)://server, or a database URI.",
    )
    registered_model_name: str = Field("layermoe", description="The registered model whose versions the rounds add.")
    experiment_name: str = Field("layermoe", description="The MLflow experiment that holds each round's run.")
    artifact_location: str | None = Field(
        default=None,
        description="Artifact root of a new experiment. None: <sqlite dir>/artifacts, or the server's default.",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, description="How long to wait for an http(s) server.")
    ready_timeout_s: int = Field(default=300, gt=0, description="How long to wait for a new version to be READY.")

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
