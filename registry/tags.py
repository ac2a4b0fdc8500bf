"""Where a version's facts live: six short tags on the version, the rest (`layermoe.*`) on its run, and their encoding.

The version list of the MLflow UI shows a version's tags, so they are the six a person scans for: kind, round,
languages, parent, verdict and how the weights are stored. The registration record (sizes, allocation, checksums, the gate's drift
and gain) is logged as params of the version's run before the version exists; MLflow refuses to change a
param, so lineage and checksums cannot be rewritten. A reviewer's reason and gate override are run tags.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

# The version's tags: short keys, since the version list shows them in a narrow column. The version page lists them
# sorted by key in a table whose fixed height (280 px) shows five rows: the sixth key, here `weights`, needs a scroll.
KIND = "kind"  # "base" or "child"
ROUND = "round"  # 0 for a base
LANGUAGES = "languages"  # "en,zh + pt": the round's old languages, then its new ones; a base: "en,zh"
PARENT_VERSION = "parent"
VERDICT = "verdict"  # "passed", "rejected", "base", or "pending" (awaiting a reviewer)
STORAGE = "weights"  # "whole" or "delta": how the version's weights are stored
VERSION_TAGS = (KIND, ROUND, LANGUAGES, PARENT_VERSION, VERDICT, STORAGE)
# Written once at registration; changing one would falsify lineage, so tag_version refuses (the verdict may change).
LINEAGE_TAGS = frozenset({KIND, ROUND, LANGUAGES, PARENT_VERSION, STORAGE})

# The registration record: params of the version's run, JSON-encoded.
ALLOCATION = "layermoe.allocation"  # new experts per layer in this round
CLASSIFIER_LAYERS = "layermoe.classifier_layers"
PARAMS_TOTAL = "layermoe.params_total"
PARAMS_ADDED = "layermoe.params_added"
MANIFEST_SHA256 = "layermoe.manifest_sha256"  # digest of the full model's file manifest
STORED_SHA256 = "layermoe.stored_sha256"  # digest of layermoe_stored.json, the version's own files
STORED_BYTES = "layermoe.stored_bytes"  # bytes this version adds to the artifact store
OLD_DRIFT_MAX = "layermoe.old_drift_max"  # largest old-language loss rise, nats: what the gate bounds
PINNED_DRIFT_MAX = "layermoe.pinned_drift_max"  # largest old-language loss rise pinned to the language, nats: 0 by construction
NEW_GAIN = "layermoe.new_gain"  # mean new-language loss decrease, nats

# Tags of the version's run, written by a decision after registration.
VERDICT_REASON = "layermoe.verdict_reason"
GATE_OVERRIDDEN = "layermoe.gate_overridden"  # "true" where a reviewer approved a version the automatic gate failed

# On the registered model, not a version: why its lifelong schedule paused (absent while it runs).
SCHEDULE_PAUSED = "layermoe.schedule_paused"

_TEXT_VALUES = frozenset({KIND, LANGUAGES, VERDICT, STORAGE, MANIFEST_SHA256, STORED_SHA256, VERDICT_REASON, GATE_OVERRIDDEN})


def encode_tags(values: Mapping[str, object]) -> dict[str, str]:
    """Strings stay as they are; numbers and lists become JSON, so they decode back to their type."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in values.items()}


def decode_tag(key: str, value: str | None) -> object:
    """The typed value of a tag or record param (int, float, list); text values, and absent ones, as stored."""
    return json.loads(value) if key not in _TEXT_VALUES and value is not None else value


def languages_tag(old: Sequence[str], new: Sequence[str] = ()) -> str:
    """`en,zh + pt`: short enough for the version list, and it says which languages the round added."""
    return ",".join(old) + (" + " + ",".join(new) if new else "")


def split_languages(value: str | None) -> tuple[list[str], list[str]]:
    """(old, new) from a `languages_tag` value; ([], []) when absent."""
    old, _, new = (value or "").partition(" + ")
    return [code for code in old.split(",") if code], [code for code in new.split(",") if code]
