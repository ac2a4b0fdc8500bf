"""What every step task shares: the cache policy, the registry retry rule and the Prefect artifacts they publish."""

import functools
import inspect
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import Task, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.runtime import flow_run
from prefect.states import State

from layermoe_core.errors import LayerMoEError
from layermoe_core.model.checkpoints import PlacementSettings, load_model
from registry import RegistryUnavailable

from .results import StepResultRecords, StepResultSerializer

# A rerun of a round with the same inputs (and the same task code) skips finished steps; the results are
# persisted under PREFECT_HOME so this works across flow runs, as JSON, looked up only through records that
# `StepResultRecords` accepts (see results.py).
STEP_CACHE = (INPUTS + TASK_SOURCE).configure(key_storage=StepResultRecords())
# For a step that loads a model where its `placement` says: where it runs does not change what it computes
# (to float rounding), so a rerun on other devices reuses it. (`STEP_CACHE - "placement"` would keep INPUTS whole.)
PLACED_STEP_CACHE = ((INPUTS - "placement") + TASK_SOURCE).configure(key_storage=StepResultRecords())


def cached_task(cache_policy: Any, **task_options: Any) -> Callable[[Callable], Task]:
    """`@task` whose result persists for the next run under `cache_policy`, as JSON that loads without running code."""
    return task(cache_policy=cache_policy, persist_result=True, result_serializer=StepResultSerializer(), **task_options)


def load_placed(model_dir: Path, placement: PlacementSettings):
    """The model in `model_dir`, placed as the plan says; a dispatched model's placement goes to the log."""
    model = load_model(model_dir, device_map=placement.device_map, max_memory=placement.max_memory, offload_folder=placement.offload_folder)
    device_map = getattr(model, "hf_device_map", None)
    if placement.device_map is not None and device_map:
        spread = ", ".join(f"{device} ({n} modules)" for device, n in Counter(map(str, device_map.values())).items())
        get_run_logger().info("%s dispatched over %s", model_dir, spread)
    return model


def file_step(output: Callable[[dict[str, Any]], Path], **task_options: Any) -> Callable[[Callable], Callable]:
    """`@cached_task(STEP_CACHE, **task_options)` for a step that writes a file or folder.

    `output(arguments)` is that path, from the call's arguments by name. Where it no longer exists, the
    step runs again instead of returning its cached result: a cache keyed on inputs cannot see that a
    user cleaned the work directory; this can.
    """

    def decorate(fn: Callable) -> Callable:
        as_task = cached_task(STEP_CACHE, **task_options)(fn)
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            arguments = signature.bind(*args, **kwargs)
            arguments.apply_defaults()
            return as_task.with_options(refresh_cache=not Path(output(arguments.arguments)).exists())(*args, **kwargs)

        return run

    return decorate


def artifact_key(text: str) -> str:
    """`text` keyed to this flow run (`round-2-bn-hi-ne-evaluation`), so every round keeps its own artifacts.

    Prefect artifact keys allow lowercase letters, digits and dashes only.
    """
    key = f"{flow_run.name}-{text}" if flow_run.name else text
    return re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")


def publish_table(key: str, table: pd.DataFrame, description: str) -> None:
    records = table.astype(object).where(table.notna(), None).to_dict(orient="records")
    create_table_artifact(table=records, key=artifact_key(key), description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(markdown=markdown, key=artifact_key(key), description=description)


# Short: a blip passes within seconds; a longer outage is the user's rerun, which reuses every finished step.
REGISTRY_RETRY_DELAYS_S = [1, 4]


def registry_unreachable(task: Task, task_run: Any, state: State) -> bool:
    """Retry a registry step only when the registry failed to answer (`RegistryUnavailable`).

    A missing version, a corrupt artifact or a bad plan fails the same way every time, so it
    fails at once; anything else unexpected is retried as before.
    """
    error = state.result(raise_on_failure=False)
    return isinstance(error, RegistryUnavailable) or not isinstance(error, LayerMoEError)
