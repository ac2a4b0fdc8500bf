"""End-to-end: the Prefect flows with a tiny model, a synthetic corpus and a temporary sqlite MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mlflow import MlflowClient
from prefect import flow

import flows.add_languages
from flows.add_languages import add_languages
from flows.bootstrap_base import BootstrapPlan, bootstrap_base
from flows.compare import ComparePlan, compare, with_variants
from flows.lifelong_expansion import run_pending_rounds
from flows.plan import ExpansionPlan, LifelongPlan, ParentRef, RoundSpec, TokenSettings
from layermoe_core.analysis.allocation import AllocationSettings
from layermoe_core.data.corpus import load_sequences, open_sequences
from layermoe_core.errors import LayerMoEError
from layermoe_core.evaluation.gates import GateDecision, GateSettings
from layermoe_core.evaluation.heldout_text import heldout_texts
from layermoe_core.evaluation.metrics import EvalSettings, language_perplexity
from layermoe_core.model.checkpoints import load_model, load_tokenizer
from layermoe_core.model.surgery import forced_old_routing
from layermoe_core.model.vocabulary import VocabularySettings, check_old_text_unchanged
from layermoe_core.training import trainer
from layermoe_core.training.trainer import Stage1Settings, Stage2Settings, TrainSettings
from registry.download import download_version
from registry.listing import list_versions
from registry.settings import RegistrySettings
from registry.versions import get_version, show_version
from tasks.common import file_step

from .synthetic_corpus import write_synthetic_corpus

pytestmark = pytest.mark.usefixtures("prefect_backend")  # one ephemeral Prefect server per module (conftest)

TOKENS = TokenSettings(seq_len=32, analysis_tokens=1_000, stage1_tokens=2_000, stage2_tokens=1_000, eval_tokens=1_000)
FAST = dict(learning_rate=3e-3, max_steps=6, per_device_batch_size=8, logging_steps=2, save_steps=3)
# A round's settings for a tiny model: a few steps per stage, and gates that pass (its quality is not the point)
FAST_ROUND: dict[str, Any] = dict(
    tokens=TOKENS,
    allocation=AllocationSettings(delta=2, clamp_similarity=1e-3),
    classifier_layer_count=1,
    stage1=Stage1Settings(**FAST),
    stage2=Stage2Settings(**FAST),
    evaluation=EvalSettings(batch_size=8, gates=GateSettings(max_old_loss_increase=10.0, require_new_improvement=False)),
)


def bootstrap_tiny_base(root: Path, languages: list[str], train: TrainSettings, **options: Any) -> BootstrapPlan:
    """A tiny base trained on `languages`, version 1 (champion) of a sqlite registry in `root`; the corpora hold
    `languages` and el, tr and hu, for rounds to add (five languages: enough held-out tokens)."""
    plan = BootstrapPlan(
        registry=RegistrySettings(tracking_uri=f"sqlite:///{root}/mlflow.db", registered_model_name="tiny"),
        corpora=write_synthetic_corpus(root / "corpus", [*languages, "el", "tr", "hu"]),
        languages=languages,
        vocab_size=400,
        size="tiny",
        train_tokens=4_000,
        tokens=TOKENS,
        train=train,
        workdir=root / "work",
        **options,
    )
    assert bootstrap_base(plan) == 1
    return plan


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A registry holding a trained tiny base (version 1, champion) and the corpora of five languages."""
    root = tmp_path_factory.mktemp("flows")
    base = bootstrap_tiny_base(root, ["en", "zh"], TrainSettings(**FAST), exposure_tokens=1_000)
    return root, base.corpora, base.registry


def test_the_base_also_trains_on_a_little_of_every_other_corpus_language(world):
    root, corpora, registry = world
    trained_on = open_sequences(root / "work" / "base" / "tokens-with-exposure.json")
    assert sorted(trained_on) == sorted(corpora)
    assert {lang: rows.num_rows for lang, rows in trained_on.items()} == {
        "en": 4_000 // 32,
        "zh": 4_000 // 32,
        "el": 1_000 // 32,
        "tr": 1_000 // 32,
        "hu": 1_000 // 32,
    }
    assert show_version(registry, 1)["languages"] == ["en", "zh"], "the base knows only its main languages"


def lifelong_plan(root, corpora, registry, rounds) -> LifelongPlan:
    return LifelongPlan(
        registry=registry,
        corpora=corpora,
        **FAST_ROUND,
        rounds=[RoundSpec(new_languages=r) for r in rounds],
        workdir=root / "work",
    )


def test_two_lifelong_rounds_register_linked_versions(world, tmp_path):
    root, corpora, registry = world
    plan_file = tmp_path / "lifelong.yaml"
    plan_file.write_text(yaml.safe_dump(lifelong_plan(root, corpora, registry, [["el"], ["tr"]]).model_dump(mode="json")))
    ticks = run_pending_rounds(plan_file)
    assert [tick.outcome for tick in ticks] == ["promoted", "promoted", "nothing to do"]
    summaries = [tick.summary for tick in ticks[:2]]
    assert [s.version for s in summaries] == [2, 3] and [s.parent_version for s in summaries] == [1, 2]

    versions = list_versions(registry)
    assert versions["version"].tolist() == [1, 2, 3]
    assert versions["parent"].tolist()[1:] == [1, 2]
    assert versions.set_index("version").loc[3, "aliases"] == "champion"
    newest = show_version(registry, "champion")
    assert newest["old_languages"] == ["en", "zh", "el"] and newest["new_languages"] == ["tr"]
    assert newest["round"] == 2 and len(newest["allocation"]) == 2 and newest["classifier_layers"]

    artifacts = MlflowClient(registry.tracking_uri)
    plots = {Path(a.path).name for a in artifacts.list_artifacts(newest["run_id"], "plots")}
    tables = {Path(a.path).name for a in artifacts.list_artifacts(newest["run_id"], "tables")}
    assert {"similarity.png", "allocation.png", "routing.png", "languages.png"} <= plots
    assert {"similarity.csv", "allocation.csv", "routing.csv", "evaluation.csv", "fertility.csv"} <= tables

    child = load_model(download_version(registry, 3, tmp_path / "v3").path)
    assert child.config.languages == ["en", "zh", "el", "tr"]
    (heldout_path,) = (root / "work").glob("lifelong-round-2-parent-v2-*/tokens/heldout.json")
    heldout = load_sequences(heldout_path)
    measured = language_perplexity(child, heldout, batch_size=8).set_index("language")["loss"]
    for lang in ("en", "tr"):
        torch.testing.assert_close(float(measured[lang]), newest["metrics"][f"loss.{lang}"], atol=1e-4, rtol=0)
    # pinned drift per old language, measured by the round: zero (docs/pinned-serving.md); the plain drift is not
    deltas = summaries[1].table().set_index(["language", "metric"])["delta"]
    for lang in newest["old_languages"]:
        assert abs(deltas[lang, "pinned_loss"]) <= 1e-6
        assert f"| {lang} | old |" in newest["description"]  # one card row per language
    assert any(abs(deltas[lang, "loss"]) > 1e-4 for lang in newest["old_languages"])
    assert abs(versions.set_index("version").loc[3, "pinned_drift_max"]) <= 1e-6
    reason = get_version(registry, 3).verdict_reason
    assert "pinned to el: " in reason
    # Stage 2's held-out classifier accuracy, per layer and language, against the target: recorded and in the gate's reason
    assert "classifier_accuracy.csv" in tables
    assert f"classifier in layer {newest['classifier_layers'][0]}: held-out accuracy" in reason


def test_failed_round_registers_nothing_and_keeps_alias(world, monkeypatch):
    root, corpora, registry = world
    before = list_versions(registry)

    def broken_stage2(*args, **kwargs):
        raise RuntimeError("injected Stage-2 failure")

    monkeypatch.setattr(trainer, "train_stage2", broken_stage2)
    plan = lifelong_plan(root, corpora, registry, [["hu"]]).round_plan(0, [], ParentRef(alias="champion"))
    with pytest.raises(RuntimeError, match="injected Stage-2 failure"):
        add_languages(plan)
    after = list_versions(registry)
    assert after["version"].tolist() == before["version"].tolist()
    assert after["aliases"].tolist() == before["aliases"].tolist()


def test_plan_naming_a_missing_parent_version_fails_clearly(world):
    root, corpora, registry = world
    plan = lifelong_plan(root, corpora, registry, [["hu"]]).round_plan(0, [], ParentRef(version=99))
    with pytest.raises(LayerMoEError, match="version 99 does not exist"):
        add_languages(plan)


def test_plan_with_language_lacking_corpus_is_refused():
    with pytest.raises(ValueError, match=r"languages \['fi'\] have no corpus"):
        ExpansionPlan(corpora={}, new_languages=["fi"])


def test_failed_gate_registers_child_as_rejected_and_keeps_alias(world, monkeypatch):
    root, corpora, registry = world
    champion_before = show_version(registry, "champion")["version"]

    def failing_gate(comparison, settings, classifier_accuracy=()):
        return GateDecision(passed=False, reasons=["old language en: loss rose beyond the bound"])

    monkeypatch.setattr(flows.add_languages, "evaluate_gates", failing_gate)
    plan = lifelong_plan(root, corpora, registry, [["hu"]]).round_plan(0, [], ParentRef(alias="champion"))
    summary = add_languages(plan)
    assert not summary.promoted
    rejected = show_version(registry, summary.version)
    assert rejected["aliases"] == [] and rejected["verdict"] == "rejected"
    assert "loss rose" in rejected["verdict_reason"]
    assert rejected["description"].startswith(f"Round {rejected['round']} +hu · REJECTED by the gate")
    assert show_version(registry, "champion")["version"] == champion_before


def test_compare_runs_layermoe_uniform_and_ablation_from_one_parent(world):
    root, corpora, registry = world
    shared = lifelong_plan(root, corpora, registry, [["hu"]]).round_plan(0, [], ParentRef(version=1))
    plan = ComparePlan.model_validate({**shared.model_dump(), "name": "cmp", "uniform_budget_factor": 2.5})
    table = compare(plan)
    assert table["variant"].tolist() == ["layermoe", "uniform", "no_classifier"]
    uniform = table.set_index("variant").loc["uniform"]
    assert uniform["new_experts"] == 2 * 3  # ceil(2.5 * delta 2 / 2 layers) = 3 per layer
    assert (table["params_added"] > 0).all() and {"loss_delta:en", "loss_delta:hu"} <= set(table.columns)
    for variant in ("layermoe", "uniform", "no_classifier"):
        version = show_version(registry, f"compare-{variant.replace('_', '-')}")
        assert version["parent_version"] == 1 and version["new_languages"] == ["hu"]
    assert show_version(registry, "compare-no-classifier")["classifier_layers"] == []


def test_compare_runs_the_other_papers_signals_on_an_equal_budget(world):
    root, corpora, registry = world
    shared = lifelong_plan(root, corpora, registry, [["hu"]]).round_plan(0, [], ParentRef(version=1)).model_dump()
    shared["allocation"].update(delta=3, neurons_per_language=8, finetune_steps=2, start_layer=1)
    plan = with_variants(ComparePlan.model_validate({**shared, "name": "signals"}), ["neuron", "param_delta", "late_layers"])
    table = compare(plan).set_index("variant")
    assert table.index.tolist() == ["neuron", "param_delta", "late_layers"]
    assert (table["new_experts"] == 3).all()  # equal_budget: every variant spends exactly delta
    assert table.loc["late_layers", "allocation"] == "0 3"
    assert {"old_drift", "old_drift_max", "new_gain", "params_added"} <= set(table.columns)
    client = MlflowClient(registry.tracking_uri)
    for variant in ("neuron", "param_delta"):
        version = show_version(registry, f"compare-{variant.replace('_', '-')}")
        files = {f.path for f in client.list_artifacts(version["run_id"], "tables")}
        assert {"tables/signal.csv", "tables/allocation.csv", "tables/allocation_total.csv"} <= files
    with pytest.raises(LayerMoEError, match=r"unknown variants \['dmoe'\]; choose from layermoe, uniform"):
        with_variants(plan, ["dmoe"])
    with pytest.raises(LayerMoEError, match="repeat a name"):
        with_variants(plan, ["neuron", "neuron"])


def test_a_step_comes_from_the_cache_until_its_output_is_deleted_then_runs_again(tmp_path):
    written = []

    @file_step(lambda arguments: arguments["out"], name="write greeting")
    def write_greeting(text: str, out: Path) -> Path:
        written.append(text)
        out.write_text(text)
        return out

    @flow
    def greet(out: Path) -> Path:
        return write_greeting("hello", out)

    out = tmp_path / "greeting.txt"
    assert greet(out) == out and greet(out) == out
    assert written == ["hello"]  # the second run came from the cache
    out.unlink()
    assert greet(out) == out and out.read_text() == "hello"
    assert written == ["hello", "hello"]  # its output was gone, so the step ran again


def test_a_round_that_extends_the_vocabulary_keeps_old_text_and_old_logits_and_is_judged_in_bits_per_byte(world, tmp_path):
    root, corpora, registry = world
    plan = lifelong_plan(root, corpora, registry, [["hu"]]).round_plan(0, [], ParentRef(version=1))
    # the extended tokenizer spends fewer tokens on hu, so its held-out split holds fewer than the other tests sample
    tokens = TOKENS.model_copy(update={"eval_tokens": 600})
    evaluation = plan.evaluation.model_copy(update={"gates": GateSettings(max_old_loss_increase=10.0)})  # new languages must improve
    plan = plan.model_copy(
        update={"vocabulary": VocabularySettings(extend=16), "promote_alias": "extended", "tokens": tokens, "evaluation": evaluation}
    )
    summary = add_languages(plan)

    parent_dir = download_version(registry, 1, tmp_path / "parent").path
    child_dir = download_version(registry, summary.version, tmp_path / "child").path
    parent_tokenizer, child_tokenizer = load_tokenizer(parent_dir), load_tokenizer(child_dir)
    child = load_model(child_dir, device="cpu")
    added = child.config.expansion_rounds[-1]["added_tokens"]
    assert 0 < added <= 16 and len(child_tokenizer) == len(parent_tokenizer) + added
    old_text = {lang: list(heldout_texts(corpora[lang], TOKENS.seed, TOKENS.heldout_fraction).values()) for lang in ("en", "zh")}
    check_old_text_unchanged(parent_tokenizer, child_tokenizer, old_text)  # byte for byte, or LayerMoEError
    ids = torch.tensor([parent_tokenizer(old_text["en"][0])["input_ids"][:24]])
    with torch.no_grad(), forced_old_routing(child):
        forced = child(ids).logits
    parent_logits = load_model(parent_dir, device="cpu")(ids).logits.detach()
    torch.testing.assert_close(forced[..., : parent_logits.shape[-1]], parent_logits, atol=1e-5, rtol=0)
    assert torch.isneginf(forced[..., parent_logits.shape[-1] :]).all()

    # fertility before and after, in the card and the run's metrics: hu got cheaper, the old languages did not change
    metrics = show_version(registry, summary.version)["metrics"]
    assert metrics["tokens_per_char.hu.child"] < metrics["tokens_per_char.hu"]
    assert all(metrics[f"tokens_per_char.{lang}.child"] == metrics[f"tokens_per_char.{lang}"] for lang in ("en", "zh"))
    assert "| extended: per character | per word |" in show_version(registry, summary.version)["description"]

    table = summary.table()
    bits = table[table["metric"] == "bits_per_byte"]
    assert sorted(bits["language"]) == ["en", "hu", "zh"]
    assert (
        f"new language hu: bits_per_byte {float(bits.loc[bits['language'] == 'hu', 'parent'].iloc[0]):.4f}"
        in get_version(registry, summary.version).verdict_reason
    )
