"""The `layermoe.*` tags of a model version: keys, and their string encoding (MLflow tag values are strings)."""

from __future__ import annotations

import json
from collections.abc import Mapping

KIND = "layermoe.kind"  # "base" or "child"
PARENT_VERSION = "layermoe.parent_version"
ROUND = "layermoe.round"  # 0 for a base
LANGUAGES = "layermoe.languages"  # every language taught so far
OLD_LANGUAGES = "layermoe.old_languages"
NEW_LANGUAGES = "layermoe.new_languages"
ALLOCATION = "layermoe.allocation"  # new experts per layer in this round
CLASSIFIER_LAYERS = "layermoe.classifier_layers"
PARAMS_TOTAL = "layermoe.params_total"
PARAMS_ADDED = "layermoe.params_added"
MANIFEST_SHA256 = "layermoe.manifest_sha256"  # digest of the full model's file manifest
STORAGE = "layermoe.storage"  # "whole" or "delta"; absent on versions stored before delta storage
STORED_SHA256 = "layermoe.stored_sha256"  # digest of layermoe_stored.json, the version's own files
STORED_BYTES = "layermoe.stored_bytes"  # bytes this version adds to the artifact store

# The round's outcome, readable in the registry's version list (not lineage: a reviewer may change them).
VERDICT = "layermoe.verdict"  # "passed", "rejected", "base", or "pending" (awaiting a reviewer)
VERDICT_REASON = "layermoe.verdict_reason"
OLD_DRIFT_MAX = "layermoe.old_drift_max"  # largest old-language loss rise, nats: what the gate bounds
PINNED_DRIFT_MAX = "layermoe.pinned_drift_max"  # largest old-language loss rise pinned to the language, nats: 0 by construction
NEW_GAIN = "layermoe.new_gain"  # mean new-language loss decrease, nats
GATE_OVERRIDDEN = "layermoe.gate_overridden"  # "true" where a reviewer approved a version the automatic gate failed

# On the registered model, not a version: why its lifelong schedule paused (absent while it runs).
SCHEDULE_PAUSED = "layermoe.schedule_paused"

# "incomplete" from the moment the version is created until its run is closed; removed then. A registration killed in
# between leaves it, so the version is never promoted; the rerun of its round finds the version and completes it.
REGISTRATION_STATE = "layermoe.registration"
INCOMPLETE = "incomplete"

# Written once at registration; changing one would falsify lineage or the checksum, so tag_version refuses.
REGISTRATION_TAGS = frozenset(
    {
        KIND,
        PARENT_VERSION,
        ROUND,
        LANGUAGES,
        OLD_LANGUAGES,
        NEW_LANGUAGES,
        ALLOCATION,
        CLASSIFIER_LAYERS,
        PARAMS_TOTAL,
        PARAMS_ADDED,
        MANIFEST_SHA256,
        STORAGE,
        STORED_SHA256,
        STORED_BYTES,
    }
)
_JSON_TAGS = (REGISTRATION_TAGS - {KIND, MANIFEST_SHA256, STORAGE, STORED_SHA256}) | {OLD_DRIFT_MAX, PINNED_DRIFT_MAX, NEW_GAIN}


def encode_tags(values: Mapping[str, object]) -> dict[str, str]:
    """Strings stay as they are; numbers and lists become JSON, so they decode back to their type."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in values.items()}


def decode_tag(key: str, value: str | None) -> object:
    """The typed value of a registration tag (int, list); other tags, and absent ones, as stored."""
    return json.loads(value) if key in _JSON_TAGS and value is not None else value
