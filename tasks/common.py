"""What every step task shares: the cache policy and the Prefect artifacts they publish."""

from __future__ import annotations

import re

import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

# A rerun of a round with the same inputs (and the same task code) skips finished steps;
# the results are persisted under PREFECT_HOME so this works across flow runs.
STEP_CACHE = INPUTS + TASK_SOURCE


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def publish_table(key: str, table: pd.DataFrame, description: str) -> None:
    records = table.astype(object).where(table.notna(), None).to_dict(orient="records")
    create_table_artifact(table=records, key=artifact_key(key), description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(markdown=markdown, key=artifact_key(key), description=description)
