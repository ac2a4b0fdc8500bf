"""What every step task shares: the cache policy, the registry retry rule and the Prefect artifacts they publish."""

import re
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import Task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.runtime import flow_run
from prefect.states import State

from layermoe_core.errors import LayerMoEError
from registry import RegistryUnavailable

# A rerun of a round with the same inputs (and the same task code) skips finished steps;
# the results are persisted under PREFECT_HOME so this works across flow runs.
STEP_CACHE = INPUTS + TASK_SOURCE


def unless_cached_output(step: Task, output: Path) -> Task:
    """`step`, made to run again if the file or folder its cached result points at was deleted.

    A cache keyed on inputs cannot see that a user cleaned the work directory; this can.
    """
    return step.with_options(refresh_cache=not Path(output).exists())


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
