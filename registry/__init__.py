"""registry: the only MLflow code. Versions of the expanded model, with lineage, checksums and aliases.

A version is a save_pretrained directory (safetensors, config, tokenizer) stored as artifacts of the
run that made it; its `layermoe.*` tags carry languages, parent, round, allocation, sizes and the
gate verdict, and its description is a markdown model card. The rest of layermoe uses this API only.
"""

from layermoe_core.environment import telemetry_off

telemetry_off()  # before mlflow is imported; an explicit opt-in wins

from .client import RegistryUnavailable  # noqa: E402
from .download import LocalVersion, cached_version, download_version  # noqa: E402
from .model_card import Verdict  # noqa: E402
from .register import RoundInfo, find_or_register_base, register_base, register_child  # noqa: E402
from .reports import log_report_run, version_table  # noqa: E402
from .settings import RegistrySettings  # noqa: E402
from .versions import (  # noqa: E402
    VersionInfo,
    alias_version,
    get_version,
    lineage,
    list_versions,
    promote,
    record_verdict,
    show_version,
    tag_version,
)

__all__ = [
    "LocalVersion",
    "RegistrySettings",
    "RegistryUnavailable",
    "RoundInfo",
    "Verdict",
    "VersionInfo",
    "alias_version",
    "cached_version",
    "download_version",
    "find_or_register_base",
    "get_version",
    "lineage",
    "list_versions",
    "log_report_run",
    "promote",
    "record_verdict",
    "register_base",
    "register_child",
    "show_version",
    "tag_version",
    "version_table",
]
