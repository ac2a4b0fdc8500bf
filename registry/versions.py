"""Read the registry's versions (find, list, show, lineage) and move aliases and tags on them."""

from __future__ import annotations

from collections.abc import Mapping

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException

from layermoe_core.errors import LayerMoEError

from .client import open_client, store_errors
from .failures import no_model_error, sole_model_name
from .settings import RegistrySettings
from .tags import LINEAGE_TAGS, PARENT_VERSION, SCHEDULE_PAUSED, VERDICT, encode_tags
from .version_info import StoredRun, VersionInfo, version_info

VersionRef = int | str  # a version number (int or digits) or an alias name


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
        raise no_model_error(settings, registered_model_names(client)) from e


def registered_model_names(client: MlflowClient) -> list[str]:
    """Every registered model's name, sorted (MLflow's search leaves prompts out)."""
    names: list[str] = []
    token = None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        names.extend(rm.name for rm in page)
        token = page.token
        if not token:
            return sorted(names)


def sole_registered_model_name(settings: RegistrySettings) -> str:
    """The store's one registered model, for commands given no name; with none or several, an error that lists them."""
    with store_errors(settings):
        return sole_model_name(settings, registered_model_names(open_client(settings, create=False)))


def _info(client: MlflowClient, mv: ModelVersion, rm: RegisteredModel) -> VersionInfo:
    run = _run_if_any(client, mv.run_id)
    return version_info(
        name=mv.name,
        version=mv.version,
        run_id=mv.run_id,
        source=mv.source,
        status=mv.status,
        aliases=[alias for alias, version in rm.aliases.items() if int(version) == int(mv.version)],
        tags=mv.tags,
        created_ms=mv.creation_timestamp,
        description=mv.description,
        run=StoredRun(run.info.status, run.data.params, run.data.tags, run.info.artifact_uri) if run else None,
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


class ClientReader:
    """The listing's reader through MLflow's client: for the stores `registry.listing` does not read itself."""

    def __init__(self, settings: RegistrySettings):
        self.settings = settings
        with store_errors(settings):
            self.client = open_client(settings, create=False)

    def model_names(self) -> list[str]:
        with store_errors(self.settings):
            return registered_model_names(self.client)

    def model(self, name: str) -> tuple[dict[str, str], list[VersionInfo]]:
        """The registered model's tags and its versions, oldest first."""
        with store_errors(self.settings):
            rm = self.client.get_registered_model(name)
            return dict(rm.tags), [_info(self.client, mv, rm) for mv in all_versions(self.client, name)]
