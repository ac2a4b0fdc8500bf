"""Step 7 of a round: routing statistics and parent-vs-child evaluation per language."""

from pathlib import Path

import pandas as pd
from prefect import task

from layermoe_core.checkpoints import load_model, load_tokenizer
from layermoe_core.data import load_sequences
from layermoe_core.evaluation import EvalSettings, compare_models, evaluate_model
from layermoe_core.routing_stats import routing_statistics

from .common import STEP_CACHE, publish_table


@task(name="routing statistics", cache_policy=STEP_CACHE, persist_result=True)
def measure_routing(model_dir: Path, tokens_path: Path, old_languages: list[str], batch_size: int) -> pd.DataFrame:
    table = routing_statistics(load_model(model_dir), load_sequences(tokens_path), old_languages, batch_size=batch_size)
    publish_table("routing", table.drop(columns=["expert_load"], errors="ignore").round(4), "Routing per layer and language")
    return table


@task(name="evaluate parent and child", cache_policy=STEP_CACHE, persist_result=True)
def evaluate_round(
    parent_dir: Path, child_dir: Path, tokens_path: Path, old_languages: list[str], new_languages: list[str], settings: EvalSettings
) -> pd.DataFrame:
    """Held-out metrics of both models on the same tokens, as the tidy comparison table."""
    sequences = load_sequences(tokens_path)
    tables = {}
    for side, model_dir in (("parent", parent_dir), ("child", child_dir)):
        tables[side] = evaluate_model(load_model(model_dir), load_tokenizer(model_dir), sequences, settings)
    comparison = compare_models(tables["parent"], tables["child"], old_languages, new_languages)
    publish_table("evaluation", comparison.round(4), "Held-out metrics per language: parent vs child")
    return comparison
