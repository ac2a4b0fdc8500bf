"""`VersionInfo`: one registered version as every reader of the store builds it, and the rules that decode it.

MLflow's client (registry/versions.py) and the listing's own readers (registry/listing.py) both hand the raw
values they read to `version_info`, so a version reads the same whichever way it was read.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict

from .tags import (
    ALLOCATION,
    CLASSIFIER_LAYERS,
    GATE_OVERRIDDEN,
    KIND,
    LANGUAGES,
    MANIFEST_SHA256,
    NEW_GAIN,
    OLD_DRIFT_MAX,
    PARAMS_ADDED,
    PARAMS_TOTAL,
    PARENT_VERSION,
    PINNED_DRIFT_MAX,
    ROUND,
    STORAGE,
    STORED_BYTES,
    STORED_SHA256,
    VERDICT,
    VERDICT_REASON,
    decode_tag,
    split_languages,
)

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


class StoredRun(NamedTuple):
    """What the store holds of a version's run: its status, params and tags (all of them; `version_info` picks)."""

    status: str
    params: Mapping[str, str]
    tags: Mapping[str, str]
    artifact_uri: str


def version_info(
    *,
    name: str,
    version: int | str,
    run_id: str | None,
    source: str,
    status: str,
    aliases: list[str],
    tags: Mapping[str, str],
    created_ms: int | str,
    description: str | None,
    run: StoredRun | None,
) -> VersionInfo:
    """A version from the values a store returns (MLflow's REST API gives numbers as text); `run` None: the run is gone."""
    return VersionInfo(
        name=name,
        version=int(version),
        run_id=run_id or None,
        source=source,
        status=status,
        aliases=sorted(aliases),
        tags=dict(tags),
        created=datetime.fromtimestamp(int(created_ms) / 1000, tz=UTC),
        description=description or None,
        run_status=run.status if run else None,
        record={k: v for k, v in run.params.items() if k.startswith("layermoe.")} if run else {},
        run_tags={k: v for k, v in run.tags.items() if k.startswith("layermoe.")} if run else {},
        artifact_uri=run.artifact_uri if run else None,
    )
