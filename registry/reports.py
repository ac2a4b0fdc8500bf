"""Log a round's reports on its run: tables (CSV, and MLflow tables for the UI), PNG plots, metrics, params."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.utils.time import get_current_time_millis

from layermoe_core.errors import LayerMoEError

from .client import ensure_experiment, open_client, store_errors
from .model_card import flatten_params
from .settings import NAME_PATTERN, RegistrySettings
from .tags import KIND, encode_tags
from .versions import VersionRef, find_version


def check_reports(tables: Mapping[str, pd.DataFrame], plots: Mapping[str, Path]) -> None:
    """Refuse names that cannot be file names and plots that are not PNG files, before anything is logged."""
    bad = [name for name in [*tables, *plots] if not NAME_PATTERN.match(name)]
    if bad:
        raise LayerMoEError(f"table/plot names {bad} must be letters, digits, '_', '.' or '-' (they become file names)")
    not_png = [str(path) for path in plots.values() if Path(path).suffix.lower() != ".png" or not Path(path).is_file()]
    if not_png:
        raise LayerMoEError(f"plots {not_png} are not existing .png files; save figures with fig.savefig('name.png')")


# MLflow's limits per log_batch call.
_MAX_METRICS_PER_BATCH, _MAX_PARAMS_PER_BATCH = 1000, 100


def log_metrics_and_params(
    client: MlflowClient,
    run_id: str,
    metrics: Mapping[str, float],
    params: Mapping[str, object] = {},
    step_metrics: Sequence[tuple[str, float, int]] = (),
) -> None:
    """Single values at step 0, curves as (key, value, step) rows, params as dotted keys (nested dicts flattened)."""
    now = get_current_time_millis()
    rows = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
    rows += [Metric(key, value, now, step) for key, value, step in step_metrics]
    flat = [Param(key, value) for key, value in encode_tags(flatten_params(params)).items()]
    for start in range(0, len(rows), _MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=rows[start : start + _MAX_METRICS_PER_BATCH])
    for start in range(0, len(flat), _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=flat[start : start + _MAX_PARAMS_PER_BATCH])


def log_reports(
    client: MlflowClient,
    run_id: str,
    tables: Mapping[str, pd.DataFrame],
    plots: Mapping[str, Path],
    metrics: Mapping[str, float],
    params: Mapping[str, object],
    step_metrics: Sequence[tuple[str, float, int]] = (),
) -> None:
    log_metrics_and_params(client, run_id, metrics, params, step_metrics)
    for name, table in tables.items():
        client.log_text(run_id, table.to_csv(index=False), f"tables/{name}.csv")
        client.log_table(run_id, table, f"tables/{name}.json")  # rendered by the MLflow UI
    with tempfile.TemporaryDirectory() as staging:  # log_artifact keeps file names; name each plot by its key
        for name, plot in plots.items():
            shutil.copyfile(plot, Path(staging) / f"{name}.png")
        if plots:
            client.log_artifacts(run_id, staging, "plots")


def log_report_run(
    settings: RegistrySettings,
    run_name: str,
    tables: Mapping[str, pd.DataFrame],
    plots: Mapping[str, Path],
    metrics: Mapping[str, float] = {},
    params: Mapping[str, object] = {},
) -> str:
    """A run that holds a report and no model (e.g. a LayerMoE-vs-uniform comparison); returns its run id."""
    check_reports(tables, plots)
    with store_errors(settings):
        client = open_client(settings)
        run = client.create_run(ensure_experiment(client, settings), run_name=run_name, tags={KIND: "report"})
        try:
            log_reports(client, run.info.run_id, tables, plots, metrics, params)
        except BaseException:
            client.set_terminated(run.info.run_id, status="FAILED")
            raise
        client.set_terminated(run.info.run_id)
        return run.info.run_id


def version_table(settings: RegistrySettings, ref: VersionRef, name: str) -> pd.DataFrame | None:
    """The table `name` logged on a version's run (`tables/<name>.csv`), e.g. `evaluation`; None where that run has none."""
    with store_errors(settings):
        client = open_client(settings, create=False)
        info = find_version(client, settings, ref)
        path = f"tables/{name}.csv"
        if info.run_id is None or path not in {entry.path for entry in client.list_artifacts(info.run_id, "tables")}:
            return None
        with tempfile.TemporaryDirectory() as staging:
            return pd.read_csv(client.download_artifacts(info.run_id, path, staging))
