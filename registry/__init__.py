"""registry: the only MLflow code. Versions of the expanded model, with lineage, checksums and aliases.

A version is a save_pretrained directory (safetensors, config, tokenizer) stored as artifacts of the
run that made it; its `layermoe.*` tags carry languages, parent, round, allocation and sizes.
"""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported; an explicit opt-in wins

from .download import LocalVersion, download_version  # noqa: E402
from .register import RoundInfo, register_base, register_child  # noqa: E402
from .settings import RegistrySettings  # noqa: E402
from .versions import VersionInfo, lineage, list_versions, newest_version, promote, show_version, tag_version  # noqa: E402

__all__ = [
    "LocalVersion",
    "RegistrySettings",
    "RoundInfo",
    "VersionInfo",
    "download_version",
    "lineage",
    "list_versions",
    "newest_version",
    "promote",
    "register_base",
    "register_child",
    "show_version",
    "tag_version",
]
