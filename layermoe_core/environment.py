"""The process environment of a local run, set before Prefect, MLflow, transformers or datasets are imported.

One place for what the demo, the tests, the benchmarks and the registry each set: telemetry off,
hubs offline, Prefect's state in a folder of the run's own. Standard library only, and nothing here
imports Prefect or MLflow: it only names their settings. A value the user exported already wins,
except where `ephemeral` says otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

TELEMETRY_OFF = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
LOCAL_RUN = {
    **TELEMETRY_OFF,
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",  # a loaded machine starts the server slowly
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def telemetry_off() -> None:
    """No usage reports from Prefect or MLflow (an explicit opt-in in the environment wins)."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def use_local_stack(
    prefect_home: str | Path, *, ephemeral: bool = False, tracking_uri: str | None = None, registry_cache: str | Path | None = None
) -> None:
    """Telemetry off, hubs offline, Prefect's state in `prefect_home` (created), and optionally MLflow's store.

    `ephemeral`: always a temporary Prefect server in `prefect_home`, even where the user's environment
    names a server (PREFECT_API_URL) or another home, so a benchmark never writes to a real deployment.
    """
    Path(prefect_home).mkdir(parents=True, exist_ok=True)
    for key, value in LOCAL_RUN.items():
        os.environ.setdefault(key, value)
    if ephemeral:
        os.environ.pop("PREFECT_API_URL", None)
        os.environ["PREFECT_HOME"] = str(prefect_home)
    else:
        os.environ.setdefault("PREFECT_HOME", str(prefect_home))
    if tracking_uri is not None:
        os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri)
    if registry_cache is not None:
        os.environ.setdefault("LAYERMOE_REGISTRY_CACHE", str(registry_cache))
