"""A first round from an HF folder (`parent: {hf_path: ...}`) that fails changes nothing in the registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.add_languages import add_languages
from flows.plan import ExpansionPlan, ParentRef, TokenSettings
from layermoe_core import LayerMoEError, expand, insert_classifiers
from layermoe_core.analysis.allocation import AllocationSettings
from layermoe_core.training import trainer
from registry import (
    RegistrySettings,
    RoundInfo,
    list_versions,
    promote,
    register_base,
    register_child,
)

from .conftest import save_with_tiny_tokenizer, tiny_model
from .synthetic_corpus import write_synthetic_corpus
from .tiny_tokenizer import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("prefect_backend")  # one ephemeral Prefect server per module (conftest)

TOKENS = TokenSettings(seq_len=16, analysis_tokens=64, stage1_tokens=64, stage2_tokens=64, eval_tokens=64)


@pytest.fixture
def base_dir(tmp_path) -> Path:
    return save_with_tiny_tokenizer(tiny_model("qwen2"), tmp_path / "hf-base")


def first_round(tmp_path: Path, registry: RegistrySettings, base_dir: Path, corpora) -> ExpansionPlan:
    return ExpansionPlan(
        registry=registry,
        corpora=corpora,
        parent=ParentRef(hf_path=base_dir, languages=["en"]),
        new_languages=["el"],
        tokens=TOKENS,
        workdir=tmp_path / "work",
        allocation=AllocationSettings(delta=2, clamp_similarity=1e-3),
        classifier_layer_count=1,
    )


def test_a_first_round_with_an_empty_corpus_leaves_an_existing_champion_alone(tmp_path, base_dir):
    registry = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    register_base(registry, base_dir, ["en"])
    child = expand(tiny_model("qwen2"), [1, 1, 1], ["en"], ["de"])
    insert_classifiers(child, [0])
    child.save_pretrained(tmp_path / "champion")
    tiny_tokenizer().save_pretrained(tmp_path / "champion")
    round_1 = RoundInfo(round=1, old_languages=["en"], new_languages=["de"], allocation=[1, 1, 1], classifier_layers=[0])
    promote(registry, register_child(registry, tmp_path / "champion", 1, round_1, {}, {}, {}, {}).version)
    corpora = write_synthetic_corpus(tmp_path / "corpus", ["en", "el"])
    corpora["el"].path.write_text("")
    before = list_versions(registry)[["version", "aliases"]]

    with pytest.raises(LayerMoEError, match=r"corpus .*el\.jsonl' is empty"):
        add_languages(first_round(tmp_path, registry, base_dir, corpora))
    assert list_versions(registry)[["version", "aliases"]].equals(before)  # no new base, champion still on version 2


def test_a_rerun_of_a_failed_first_round_reuses_its_base_and_round_folder(tmp_path, base_dir, monkeypatch):
    registry = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    # Every token sample, held-out included, is drawn before Stage 1: the corpus holds enough held-out text for it.
    plan = first_round(tmp_path, registry, base_dir, write_synthetic_corpus(tmp_path / "corpus", ["en", "el"], documents=800))

    def stage1_breaks(*args, **kwargs):
        raise RuntimeError("injected Stage-1 failure")

    monkeypatch.setattr(trainer, "train_stage1", stage1_breaks)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="injected Stage-1 failure"):
            add_languages(plan)
    versions = list_versions(registry)
    assert versions["version"].tolist() == [1] and versions["aliases"].tolist() == [""]  # one base, no alias moved
    assert [p.name.split("-parent-")[1][:2] for p in (tmp_path / "work").glob("add-languages-parent-*")] == ["v1"]
