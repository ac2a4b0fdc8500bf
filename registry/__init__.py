"""registry: the only MLflow code. Versions of the expanded model, with lineage, checksums and aliases.

A version is a save_pretrained directory (safetensors, config, tokenizer) stored as artifacts of the
run that made it. Its six `layermoe.*` tags carry kind, round, languages, parent, verdict and storage;
its run's params the rest (sizes, allocation, checksums, drift); its description is a markdown model card
(registry/tags.py says which fact lives where). The rest of layermoe uses this API only.

Names load on first use (PEP 562), so browsing (`registry list`) imports MLflow but not torch or the
registration code.
"""

from importlib import import_module

from layermoe_core.environment import telemetry_off

telemetry_off()  # before mlflow is imported; an explicit opt-in wins

_LAZY = {
    "RegistryUnavailable": "failures",
    "LocalVersion": "download",
    "cached_version": "download",
    "download_version": "download",
    "Verdict": "model_card",
    "record_verdict": "model_card",
    "RoundInfo": "register",
    "find_or_register_base": "register",
    "register_base": "register",
    "register_child": "register",
    "log_report_run": "reports",
    "RegistrySettings": "settings",
    "VersionInfo": "version_info",
    "alias_version": "versions",
    "get_version": "versions",
    "lineage": "versions",
    "list_versions": "listing",
    "promote": "versions",
    "show_version": "versions",
    "tag_version": "versions",
    "version_table": "reports",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
