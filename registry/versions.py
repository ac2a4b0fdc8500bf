"""Read the registry's versions (find, list, show, lineage) and move aliases and tags on them."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict

from layermoe_core.errors import LayerMoEError

from .client import open_client, store_errors
from .settings import RegistrySettings
from .tags import (
    ALLOCATION,
    CLASSIFIER_LAYERS,
    GATE_OVERRIDDEN,
    KIND,
    LANGUAGES,
    LINEAGE_TAGS,
    MANIFEST_SHA256,
    NEW_GAIN,
    OLD_DRIFT_MAX,
    PARAMS_ADDED,
    PARAMS_TOTAL,
    PARENT_VERSION,
    PINNED_DRIFT_MAX,
    ROUND,
    SCHEDULE_PAUSED,
    STORAGE,
    STORED_BYTES,
    STORED_SHA256,
    VERDICT,
    VERDICT_REASON,
    decode_tag,
    encode_tags,
    split_languages,
)

VersionRef = int | str  # a version number (int or digits) or an alias name
READY = "READY"


class VersionInfo(BaseModel):
    """One registered model version, with its aliases (which MLflow's search results leave out) and what its
    run records: its status, its `layermoe.*` params (the registration record) and tags (a reviewer's notes)."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: int
    run_id: str | None
    source: str
    status: str
    aliases: list[str]
    tags: dict[str, str]
    created: datetime
    description: str | None = None
    run_status: str | None = None  # None: the run is gone
    record: dict[str, str] = {}
    run_tags: dict[str, str] = {}
    artifact_uri: str | None = None  # its run's artifact root; None: the run is gone

    def tag(self, key: str) -> Any:
        """A `layermoe.*` value decoded to its type (int, list, float: the key's), from the version's tags, else its
        run's record or tags; None when absent."""
        value = self.tags.get(key, self.record.get(key, self.run_tags.get(key)))
        return decode_tag(key, value)

    @property
    def kind(self) -> str | None:
        return self.tags.get(KIND)

    @property
    def parent_version(self) -> int | None:
        return self.tag(PARENT_VERSION)

    @property
    def round(self) -> int:
        return self.tag(ROUND) or 0

    @property
    def languages(self) -> list[str]:
        """Every language the version was trained for: the round's old languages, then its new ones."""
        return self.old_languages + self.new_languages

    @property
    def old_languages(self) -> list[str]:
        return split_languages(self.tags.get(LANGUAGES))[0]

    @property
    def new_languages(self) -> list[str]:
        return split_languages(self.tags.get(LANGUAGES))[1]

    @property
    def allocation(self) -> list[int]:
        return self.tag(ALLOCATION) or []

    @property
    def classifier_layers(self) -> list[int]:
        return self.tag(CLASSIFIER_LAYERS) or []

    @property
    def params_total(self) -> int | None:
        return self.tag(PARAMS_TOTAL)

    @property
    def params_added(self) -> int | None:
        return self.tag(PARAMS_ADDED)

    @property
    def manifest_sha256(self) -> str | None:
        return self.record.get(MANIFEST_SHA256)

    @property
    def stored_sha256(self) -> str | None:
        return self.record.get(STORED_SHA256)

    @property
    def storage(self) -> str:
        """ "delta" (only what the round changed, rebuilt from the lineage) or "whole"."""
        return self.tags.get(STORAGE, "whole")

    @property
    def stored_bytes(self) -> int | None:
        return self.tag(STORED_BYTES)

    @property
    def verdict(self) -> str | None:
        """ "passed", "rejected", "base" or "pending" (awaiting a reviewer)."""
        return self.tags.get(VERDICT)

    @property
    def verdict_reason(self) -> str | None:
        return self.run_tags.get(VERDICT_REASON)

    @property
    def gate_overridden(self) -> bool:
        return self.run_tags.get(GATE_OVERRIDDEN) == "true"

    @property
    def old_drift_max(self) -> float | None:
        return self.tag(OLD_DRIFT_MAX)

    @property
    def pinned_drift_max(self) -> float | None:
        return self.tag(PINNED_DRIFT_MAX)

    @property
    def new_gain(self) -> float | None:
        return self.tag(NEW_GAIN)

    @property
    def is_complete(self) -> bool:
        """Its registration closed its run: a registration killed after creating the version leaves the run open
        (or FAILED), and the rerun of its round completes it."""
        return self.run_status == "FINISHED"

    @property
    def is_ready(self) -> bool:
        """Fully written: READY in MLflow, carrying its checksum manifest digest, its registration complete."""
        return self.status == READY and self.manifest_sha256 is not None and self.is_complete


def parse_ref(ref: VersionRef) -> int | str:
    """A version number as int, an alias as str; digit strings (from a CLI) are version numbers."""
    if isinstance(ref, int) and not isinstance(ref, bool) and ref > 0:
        return ref
    if isinstance(ref, str) and ref.isdigit() and int(ref) > 0:
        return int(ref)
    if isinstance(ref, str) and ref and not ref.isdigit():
        return ref
    raise LayerMoEError(f"version reference {ref!r} is neither a version number (1, 2, ...) nor an alias name (e.g. 'champion')")


def all_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return sorted(versions, key=lambda mv: int(mv.version))


def registered_model(client: MlflowClient, settings: RegistrySettings) -> RegisteredModel:
    try:
        return client.get_registered_model(settings.registered_model_name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        existing = [rm.name for rm in client.search_registered_models()]
        raise LayerMoEError(
            f"registered model {settings.registered_model_name!r} does not exist at {settings.tracking_uri} "
            f"(registered models there: {existing}); register a base model first with registry.register_base"
        ) from e


def sole_registered_model_name(settings: RegistrySettings) -> str:
    """The store's one registered model, for commands given no name; with none or several, an error that lists them."""
    with store_errors(settings):
        names = sorted(rm.name for rm in open_client(settings, create=False).search_registered_models())
    if len(names) == 1:
        return names[0]
    if not names:
        raise LayerMoEError(f"{settings.tracking_uri} has no registered model yet; register a base model first (a round's plan does)")
    raise LayerMoEError(
        f"{settings.tracking_uri} holds {len(names)} registered models ({', '.join(names)}); pick one with --model-name, "
        f"e.g. --model-name {names[0]}"
    )


def _aliases_by_version(rm: RegisteredModel) -> dict[int, list[str]]:
    by_version: dict[int, list[str]] = {}
    for alias, version in sorted(rm.aliases.items()):
        by_version.setdefault(int(version), []).append(alias)
    return by_version


def _info(client: MlflowClient, mv: ModelVersion, rm: RegisteredModel) -> VersionInfo:
    run = _run_if_any(client, mv.run_id)
    return VersionInfo(
        name=mv.name,
        version=int(mv.version),
        run_id=mv.run_id or None,
        source=mv.source,
        status=mv.status,
        aliases=_aliases_by_version(rm).get(int(mv.version), []),
        tags=dict(mv.tags),
        created=datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC),
        description=mv.description or None,
        run_status=run.info.status if run else None,
        record={k: v for k, v in run.data.params.items() if k.startswith("layermoe.")} if run else {},
        run_tags={k: v for k, v in run.data.tags.items() if k.startswith("layermoe.")} if run else {},
        artifact_uri=run.info.artifact_uri if run else None,
    )


def _run_if_any(client: MlflowClient, run_id: str | None) -> Run | None:
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None


def find_version(client: MlflowClient, settings: RegistrySettings, ref: VersionRef, model: RegisteredModel | None = None) -> VersionInfo:
    """The version `ref` names; if none, a LayerMoEError that lists the versions and aliases there are.
    model: the registered model, where the caller holds it already (one query less a version down a lineage)."""
    rm = model or registered_model(client, settings)
    target = parse_ref(ref)
    version = rm.aliases.get(target) if isinstance(target, str) else target
    if version is not None:
        try:
            return _info(client, client.get_model_version(rm.name, str(version)), rm)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    what = f"alias {target!r} is not set" if isinstance(target, str) else f"version {target} does not exist"
    existing = [int(mv.version) for mv in all_versions(client, rm.name)]
    raise LayerMoEError(
        f"{what} on registered model {rm.name!r}: it has versions {existing} and aliases {dict(sorted(rm.aliases.items()))}; "
        "pass one of those, or promote a version with registry.promote"
    )


def get_version(settings: RegistrySettings, ref: VersionRef) -> VersionInfo:
    """The version `ref` (a number or an alias) names."""
    with store_errors(settings):
        return find_version(open_client(settings, create=False), settings, ref)


def alias_version(settings: RegistrySettings, alias: str) -> int | None:
    """The version `alias` points at, or None when it is not set (or the model has no versions yet)."""
    with store_errors(settings):
        client = open_client(settings)
        try:
            return int(client.get_registered_model(settings.registered_model_name).aliases[alias])
        except KeyError:
            return None
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None


def schedule_pause_note(settings: RegistrySettings) -> str | None:
    """Why the model's lifelong schedule paused itself, or None (no store, no model, or not paused)."""
    try:
        with store_errors(settings):
            return registered_model(open_client(settings, create=False), settings).tags.get(SCHEDULE_PAUSED)
    except LayerMoEError:
        return None


def set_schedule_pause_note(settings: RegistrySettings, note: str | None) -> None:
    """Write (or, with None, clear) the note `registry list` shows under the versions while a schedule is paused."""
    if note is None and schedule_pause_note(settings) is None:
        return
    with store_errors(settings):
        client = open_client(settings)
        if note is None:
            client.delete_registered_model_tag(settings.registered_model_name, SCHEDULE_PAUSED)
        else:
            client.set_registered_model_tag(settings.registered_model_name, SCHEDULE_PAUSED, note)


def promote(settings: RegistrySettings, version: VersionRef, alias: str = "champion") -> VersionInfo:
    """Point `alias` at a fully written version (READY, with its manifest); the only way aliases move."""
    if alias.isdigit():
        raise LayerMoEError(f"alias {alias!r} would read as a version number; choose a name such as 'champion'")
    with store_errors(settings):
        client = open_client(settings, create=False)
        info = find_version(client, settings, version)
        if not info.is_ready:
            raise LayerMoEError(
                f"version {info.version} is not fully registered (status {info.status}, manifest tag "
                f"{'present' if info.manifest_sha256 else 'missing'}, registration {'complete' if info.is_complete else 'incomplete'}); "
                "rerun its round, which completes it, or re-register its checkpoint before promoting"
            )
        for attempt in range(3):
            try:
                client.set_registered_model_alias(info.name, alias, str(info.version))
                break
            except MlflowException as e:
                if e.error_code == "INVALID_PARAMETER_VALUE":
                    raise LayerMoEError(f"alias {alias!r} is refused by MLflow ({e.message}); use letters, digits, '_' or '-'") from e
                if attempt == 2 or not _alias_write_collided(e):
                    raise
            except Exception as e:
                if attempt == 2 or not _alias_write_collided(e):
                    raise
        return find_version(client, settings, info.version)


def _alias_write_collided(error: Exception) -> bool:
    """Two processes moving one alias at once on a SQL store collide in MLflow's delete-then-insert; the retry wins."""
    return "UNIQUE constraint" in str(error) or "IntegrityError" in str(error) or "duplicate key" in str(error)


def tag_version(settings: RegistrySettings, version: VersionRef, tags: Mapping[str, object]) -> VersionInfo:
    """Add a note to the version's run (e.g. `layermoe.gate_overridden`); the version's own tags stay six, and its
    lineage tags stay as written."""
    protected = sorted(set(tags) & (LINEAGE_TAGS | {VERDICT}))
    if protected:
        raise LayerMoEError(f"tags {protected} are written at registration (the verdict by record_verdict); choose other keys")
    with store_errors(settings):
        client = open_client(settings, create=False)
        info = find_version(client, settings, version)
        if info.run_id is None:
            raise LayerMoEError(f"version {info.version} has no run to note {sorted(tags)} on; re-register its checkpoint")
        for key, value in encode_tags(tags).items():
            client.set_tag(info.run_id, key, value)
        return find_version(client, settings, info.version)


def lineage(settings: RegistrySettings, ref: VersionRef) -> list[VersionInfo]:
    """`ref`'s version, its parent, and so on back to the base (newest first)."""
    with store_errors(settings):
        return lineage_with(open_client(settings, create=False), settings, ref)


def lineage_with(client: MlflowClient, settings: RegistrySettings, ref: VersionRef) -> list[VersionInfo]:
    chain = [find_version(client, settings, ref)]
    while (parent := chain[-1].parent_version) is not None:
        if any(v.version == parent for v in chain):
            raise LayerMoEError(f"lineage of version {chain[0].version} loops at version {parent}; fix its {PARENT_VERSION} tag")
        try:
            chain.append(find_version(client, settings, parent))
        except LayerMoEError as e:
            raise LayerMoEError(
                f"the lineage of version {chain[0].version} is broken at version {chain[-1].version}: its parent, {e}"
            ) from e
    return chain


def all_infos(client: MlflowClient, settings: RegistrySettings) -> list[VersionInfo]:
    rm = registered_model(client, settings)
    return [_info(client, mv, rm) for mv in all_versions(client, rm.name)]


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


def list_versions(settings: RegistrySettings) -> pd.DataFrame:
    """One row per version, oldest first: lineage, the gate verdict with the worst old-language drift (plain, and
    pinned to the language), the new-language gain (nats), how it is stored, and its status (INCOMPLETE: a
    registration killed half-way)."""
    with store_errors(settings):
        infos = all_infos(open_client(settings, create=False), settings)
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
        for info in infos
    ]
    frame = pd.DataFrame(rows, columns=LIST_COLUMNS)
    floats = {"old_drift_max": "float64", "pinned_drift_max": "float64", "new_gain": "float64"}
    return frame.astype({"parent": "Int64", "round": "Int64", "stored_bytes": "Int64", **floats})


def show_version(settings: RegistrySettings, ref: VersionRef) -> dict:
    """Everything a person asks about one version: its tags and registration record decoded, a reviewer's notes,
    and the metrics and other params of its run."""
    with store_errors(settings):
        client = open_client(settings, create=False)
        info = find_version(client, settings, ref)
        run = client.get_run(info.run_id) if info.run_id else None
    return {
        "name": info.name,
        "version": info.version,
        "aliases": info.aliases,
        "status": info.status,
        "created": info.created.isoformat(),
        "description": info.description,
        "run_id": info.run_id,
        "source": info.source,
        "kind": info.kind,
        "round": info.round,
        "parent_version": info.parent_version,
        "verdict": info.verdict,
        "storage": info.storage,
        **{key.removeprefix("layermoe."): info.tag(key) for key in sorted(info.record)},
        "languages": info.languages,
        "old_languages": info.old_languages,
        "new_languages": info.new_languages,
        "verdict_reason": info.verdict_reason,
        "gate_overridden": info.gate_overridden,
        "tags": info.tags,
        "metrics": dict(run.data.metrics) if run else {},
        "params": {k: v for k, v in run.data.params.items() if not k.startswith("layermoe.")} if run else {},
    }
