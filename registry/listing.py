"""`registry list`: the versions of a registered model, read without importing MLflow.

`import mlflow` alone outweighs the whole listing (docs/registry.md, "How long `registry list` takes"), so the
two stores layermoe sets up are read directly, read-only: a sqlite file through `sqlite3` (`mode=ro`, which never
creates one), a tracking server through its REST API. Any other store (PostgreSQL, MySQL, ...) is read through
MLflow's client. Every reader hands the same raw values to `version_info`, which decodes them in one place.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol
from urllib.parse import urlencode

from layermoe_core.errors import LayerMoEError

from .failures import no_model_error, no_store_error, not_mlflow_error, refused_error, sole_model_name, unavailable_error
from .settings import RegistrySettings
from .tags import ROUND, SCHEDULE_PAUSED
from .version_info import StoredRun, VersionInfo, version_info

if TYPE_CHECKING:
    import pandas as pd

IS_PROMPT = "mlflow.prompt.is_prompt"  # MLflow keeps prompts as registered models with this tag; its searches skip them
WORKSPACE = "default"  # the rows a single-tenant MLflow store reads and writes
DELETED_VERSION_STAGE = "Deleted_Internal"  # a deleted version's row, until MLflow drops it
# MLflow client settings the REST reader does not implement (TLS certificates, auth plugins): those use MLflow's client.
CLIENT_ONLY_ENV = (
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_TRACKING_AUTH",
)

LIST_COLUMNS = [
    "version",
    "aliases",
    "parent",
    "round",
    "languages",
    "new_languages",
    "verdict",
    "old_drift_max",
    "pinned_drift_max",
    "new_gain",
    "storage",
    "stored_bytes",
    "created",
    "status",
    "run_id",
]


class StoreReader(Protocol):
    def model_names(self) -> list[str]:
        """Every registered model's name, sorted, prompts left out."""
        ...

    def model(self, name: str) -> tuple[dict[str, str], list[VersionInfo]]:
        """The registered model's tags and its versions, oldest first."""
        ...


class RegistryListing(NamedTuple):
    name: str
    versions: list[VersionInfo]
    schedule_pause_note: str | None  # why the model's lifelong schedule paused, while it is


def read_listing(settings: RegistrySettings, find_name: bool = False) -> RegistryListing:
    """The registered model's versions; with `find_name`, of the store's only registered model (else an error naming them)."""
    reader = store_reader(settings)
    names = reader.model_names()
    name = sole_model_name(settings, names) if find_name else settings.registered_model_name
    if name not in names:
        raise no_model_error(settings, names)
    tags, versions = reader.model(name)
    return RegistryListing(name, versions, tags.get(SCHEDULE_PAUSED))


def list_versions(settings: RegistrySettings) -> pd.DataFrame:
    """One row per version, oldest first: lineage, the gate verdict with the worst old-language drift (plain, and
    pinned to the language), the new-language gain (nats), how it is stored, and its status (INCOMPLETE: a
    registration killed half-way)."""
    return versions_frame(read_listing(settings).versions)


def versions_frame(versions: list[VersionInfo]) -> pd.DataFrame:
    import pandas as pd

    rows = [
        {
            "version": info.version,
            "aliases": ",".join(info.aliases),
            "parent": info.parent_version,
            "round": info.tag(ROUND),
            "languages": ",".join(info.languages),
            "new_languages": ",".join(info.new_languages),
            "verdict": info.verdict or "",
            "old_drift_max": info.old_drift_max,
            "pinned_drift_max": info.pinned_drift_max,
            "new_gain": info.new_gain,
            "storage": info.storage,
            "stored_bytes": info.stored_bytes,
            "created": info.created,
            "status": info.status if info.is_complete else "INCOMPLETE",
            "run_id": info.run_id,
        }
        for info in versions
    ]
    frame = pd.DataFrame(rows, columns=LIST_COLUMNS)
    floats = {"old_drift_max": "float64", "pinned_drift_max": "float64", "new_gain": "float64"}
    return frame.astype({"parent": "Int64", "round": "Int64", "stored_bytes": "Int64", **floats})


def store_reader(settings: RegistrySettings) -> StoreReader:
    """The fastest reader for the settings' store."""
    if settings.sqlite_path is not None:
        return SqliteReader(settings)
    if settings.is_http and not any(os.environ.get(key) for key in CLIENT_ONLY_ENV):
        return RestReader(settings)
    from .versions import ClientReader

    return ClientReader(settings)


class SqliteReader:
    """MLflow's sqlite store, opened read-only: the tables of the registry and of the versions' runs."""

    def __init__(self, settings: RegistrySettings):
        path = settings.sqlite_path
        assert path is not None
        if not path.is_file():
            raise no_store_error(settings, path)
        self.settings = settings
        self.db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)

    def _rows(self, query: str, *args: Any) -> list[tuple]:
        try:
            return self.db.execute(query, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise LayerMoEError(
                f"{self.settings.tracking_uri} is not a store of the installed MLflow ({e}); "
                f"if an older MLflow made it, upgrade it with `mlflow db upgrade {self.settings.tracking_uri}`"
            ) from e

    def model_names(self) -> list[str]:
        query = (
            "SELECT name FROM registered_models WHERE workspace = ? AND name NOT IN "
            "(SELECT name FROM registered_model_tags WHERE workspace = ? AND key = ? AND value = 'true') ORDER BY name"
        )
        return [name for (name,) in self._rows(query, WORKSPACE, WORKSPACE, IS_PROMPT)]

    def model(self, name: str) -> tuple[dict[str, str], list[VersionInfo]]:
        tags = dict(self._rows("SELECT key, value FROM registered_model_tags WHERE workspace = ? AND name = ?", WORKSPACE, name))
        aliases: dict[int, list[str]] = {}
        for alias, version in self._rows(
            "SELECT alias, version FROM registered_model_aliases WHERE workspace = ? AND name = ?", WORKSPACE, name
        ):
            aliases.setdefault(version, []).append(alias)
        version_tags: dict[int, dict[str, str]] = {}
        for version, key, value in self._rows(
            "SELECT version, key, value FROM model_version_tags WHERE workspace = ? AND name = ?", WORKSPACE, name
        ):
            version_tags.setdefault(version, {})[key] = value
        versions = self._rows(
            "SELECT version, run_id, source, status, creation_time, description FROM model_versions "
            "WHERE workspace = ? AND name = ? AND current_stage != ? ORDER BY version",
            WORKSPACE,
            name,
            DELETED_VERSION_STAGE,
        )
        runs = self._runs([run_id for _, run_id, *_ in versions if run_id])
        return tags, [
            version_info(
                name=name,
                version=version,
                run_id=run_id,
                source=source,
                status=status,
                aliases=aliases.get(version, []),
                tags=version_tags.get(version, {}),
                created_ms=created_ms,
                description=description,
                run=runs.get(run_id),
            )
            for version, run_id, source, status, created_ms, description in versions
        ]

    def _runs(self, run_ids: list[str]) -> dict[str, StoredRun]:
        marks = ",".join("?" * len(run_ids))
        params: dict[str, dict[str, str]] = {run_id: {} for run_id in run_ids}
        tags: dict[str, dict[str, str]] = {run_id: {} for run_id in run_ids}
        for run_id, key, value in self._rows(f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({marks})", *run_ids):
            params[run_id][key] = value
        for run_id, key, value in self._rows(f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({marks})", *run_ids):
            tags[run_id][key] = value
        statuses = self._rows(f"SELECT run_uuid, status, artifact_uri FROM runs WHERE run_uuid IN ({marks})", *run_ids)
        return {run_id: StoredRun(status, params[run_id], tags[run_id], artifact_uri) for run_id, status, artifact_uri in statuses}


class RestReader:
    """An MLflow tracking server, through the REST API its own client calls; credentials as MLflow's client takes them."""

    def __init__(self, settings: RegistrySettings):
        self.settings = settings
        self.headers = {"User-Agent": "layermoe"}
        token, user = os.environ.get("MLFLOW_TRACKING_TOKEN"), os.environ.get("MLFLOW_TRACKING_USERNAME")
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        elif user:
            basic = base64.b64encode(f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()).decode()
            self.headers["Authorization"] = f"Basic {basic}"

    def _get(self, endpoint: str, timeout_s: float | None = None, **params: object) -> dict | None:
        """The answer's JSON; None for RESOURCE_DOES_NOT_EXIST."""
        url = f"{self.settings.tracking_uri.rstrip('/')}/api/2.0/mlflow/{endpoint}?{urlencode(params)}"
        request = urllib.request.Request(url, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.settings.request_timeout_s) as response:
                status, content_type, body = response.status, response.headers.get("Content-Type"), response.read()
        except urllib.error.HTTPError as e:
            status, content_type, body = e.code, e.headers.get("Content-Type"), e.read()
        except OSError as e:  # refused, unresolvable, timed out (URLError and TimeoutError are OSErrors)
            raise unavailable_error(self.settings, e, None) from e
        if status >= 500:
            raise unavailable_error(self.settings, RuntimeError(f"HTTP {status}"), None)
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise not_mlflow_error(self.settings, status, content_type)
        if status == 200:
            return answer
        if answer.get("error_code") == "RESOURCE_DOES_NOT_EXIST":
            return None
        if "error_code" not in answer:
            raise not_mlflow_error(self.settings, status, content_type)
        raise refused_error(self.settings, answer.get("message", f"HTTP {status}"))

    def _pages(self, endpoint: str, key: str, timeout_s: float | None = None, **params: object) -> Iterator[dict]:
        token = None
        while True:
            answer = self._get(endpoint, timeout_s, **params, **({"page_token": token} if token else {})) or {}
            yield from answer.get(key, [])
            token = answer.get("next_page_token")
            if not token:
                return

    def model_names(self) -> list[str]:
        search = self._pages(
            "registered-models/search",
            "registered_models",
            self.settings.connect_timeout_s,  # the first request: a dead server fails as fast as the client's probe
            filter=f"tag.`{IS_PROMPT}` != 'true'",
            max_results=1000,
        )
        return sorted(rm["name"] for rm in search)

    def model(self, name: str) -> tuple[dict[str, str], list[VersionInfo]]:
        rm = (self._get("registered-models/get", name=name) or {}).get("registered_model", {})  # {}: deleted since listed
        aliases: dict[int, list[str]] = {}
        for alias in rm.get("aliases", []):
            aliases.setdefault(int(alias["version"]), []).append(alias["alias"])
        versions = sorted(
            self._pages("model-versions/search", "model_versions", filter=f"name = '{name}'", max_results=10000),
            key=lambda mv: int(mv["version"]),
        )
        return _key_values(rm.get("tags")), [
            version_info(
                name=name,
                version=mv["version"],
                run_id=mv.get("run_id"),
                source=mv.get("source", ""),
                status=mv.get("status", ""),
                aliases=aliases.get(int(mv["version"]), []),
                tags=_key_values(mv.get("tags")),
                created_ms=mv["creation_timestamp"],
                description=mv.get("description"),
                run=self._run(mv.get("run_id")),
            )
            for mv in versions
        ]

    def _run(self, run_id: str | None) -> StoredRun | None:
        answer = self._get("runs/get", run_id=run_id) if run_id else None
        if answer is None:
            return None
        run = answer["run"]
        data = run.get("data", {})
        return StoredRun(run["info"]["status"], _key_values(data.get("params")), _key_values(data.get("tags")), run["info"]["artifact_uri"])


def _key_values(pairs: list[dict] | None) -> dict[str, str]:
    """MLflow's JSON `[{"key": k, "value": v}, ...]` as a dict (an empty value may come without its "value")."""
    return {pair["key"]: pair.get("value", "") for pair in pairs or []}
