"""Training stages on tiny models: what each stage changes, what it learns, and resuming."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from layermoe_core import LayerMoEError, expand, insert_classifiers, set_trainable
from layermoe_core.analysis.routing_stats import routing_statistics
from layermoe_core.model.losses import IGNORE_INDEX, NEW, OLD
from layermoe_core.plots import plot_routing_heatmap
from layermoe_core.training.trainer import (
    MetricsCallback,
    Stage1Settings,
    Stage2Settings,
    TrainSettings,
    collate_sequences,
    replay_mix,
    train_causal_lm,
    train_stage1,
    train_stage2,
)

from .conftest import tiny_model

QUICK = dict(per_device_batch_size=8, logging_steps=5, save_steps=1000)
# Wide enough that the frozen random lm_head can express the new language's transitions, and
# that 97 token embeddings are linearly separable by language (Cover: 97 points < 2 * 129).
WIDE = dict(hidden_size=128, intermediate_size=128)


def cyclic_language(first_id: int, num_ids: int, stride: int, num_sequences: int, seq_len: int = 16, seed: int = 0):
    """Sequences of one synthetic language: ids first_id..first_id+num_ids-1, next id = previous + stride (cyclic)."""
    starts = torch.randint(0, num_ids, (num_sequences, 1), generator=torch.Generator().manual_seed(seed))
    return first_id + (starts + stride * torch.arange(seq_len)) % num_ids  # (num_sequences, seq_len)


def old_language(num_sequences: int, seed: int = 0):
    return cyclic_language(0, 41, 5, num_sequences, seed=seed)  # ids 0-40


def new_language(num_sequences: int, seed: int = 0):
    return cyclic_language(41, 56, 3, num_sequences, seed=seed)  # ids 41-96


@torch.no_grad()
def lm_loss(model, tokens) -> float:
    model.eval()
    return model(input_ids=tokens, labels=tokens).loss.item()  # dense: LM loss; expanded: LM + coef * balance


def frozen_and_trainable(model, trainable_names):
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    return state, set(trainable_names)


def perturb_routers_towards_new_experts(model, seed: int = 0) -> None:
    """Start Stage 2 from routers that send most tokens, old ones included, to the new experts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.moe_blocks().values():
            gate = block.router.gate
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=generator))
            gate.weight[: block.num_old_experts] = 0


class StopAfterStep(TrainerCallback):
    """Simulates a crash after a given optimizer step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash after step {self.step}")


def test_stage1_lowers_new_language_loss_and_leaves_frozen_tensors_bit_identical(tmp_path):
    model = expand(tiny_model(**WIDE), [2, 1, 2], ["en"], ["el"])
    before, trainable = frozen_and_trainable(model, set_trainable(model, "stage1"))
    held_out = new_language(16, seed=1)
    loss_before = lm_loss(model, held_out)

    settings = Stage1Settings(learning_rate=3e-2, max_steps=20, weight_decay=0.1, **QUICK)
    result = train_stage1(model, {"el": new_language(64)}, settings, tmp_path)

    assert lm_loss(model, held_out) < 0.75 * loss_before
    after = model.state_dict()
    for name in before:
        if name not in trainable:
            assert torch.equal(after[name], before[name]), f"frozen {name} changed"
    assert any(not torch.equal(after[name], before[name]) for name in trainable if ".new_experts." in name)
    assert set(result.final_metrics) >= {"lm_loss", "balance_loss", "loss"}
    reloaded = AutoModelForCausalLM.from_pretrained(result.model_dir)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, after[name]), name


def test_optimizer_holds_exactly_the_trainable_parameters(tmp_path):
    model = expand(tiny_model(), [1, 0, 2], ["en"], ["el"])
    insert_classifiers(model, [2])
    seen = {}

    class CaptureOptimizer(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            seen["optimized"] = {id(p) for group in optimizer.param_groups for p in group["params"]}
            seen["trainable"] = {id(p) for p in model.parameters() if p.requires_grad}

    settings = Stage2Settings(learning_rate=1e-3, max_steps=1, **QUICK)
    train_stage2(model, {"en": old_language(8)}, {"el": new_language(8)}, settings, tmp_path, [CaptureOptimizer()])

    assert seen["optimized"] == seen["trainable"]
    assert len(seen["trainable"]) == 2 + 2  # the routers of layers 0 and 2, the classifier's weight and bias


def test_stage2_raises_old_language_routing_to_old_experts_and_changes_only_routers_and_classifiers(tmp_path):
    model = expand(tiny_model(), [2, 2, 2], ["en"], ["el"])
    perturb_routers_towards_new_experts(model)
    insert_classifiers(model, [1])
    held_out = {"en": old_language(8, seed=1), "el": new_language(8, seed=1)}
    old_before = routing_statistics(model, held_out, ["en"]).query("language == 'en'")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    settings = Stage2Settings(learning_rate=5e-2, max_steps=30, lpr_coef=1.0, classifier_coef=1.0, **QUICK)
    result = train_stage2(model, {"en": old_language(48)}, {"el": new_language(48)}, settings, tmp_path)

    old_after = routing_statistics(model, held_out, ["en"]).query("language == 'en'")
    assert old_after["router_old_mass"].mean() > old_before["router_old_mass"].mean() + 0.3
    assert old_after["old_expert_fraction"].mean() > old_before["old_expert_fraction"].mean() + 0.3
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed, "Stage 2 changed nothing"
    assert all(name.endswith(("gate.weight", "classifier.weight", "classifier.bias")) and ".routers.0." in name for name in changed)
    assert set(result.final_metrics) >= {"lm_loss", "lpr_loss", "classifier_loss", "classifier_accuracy"}
    assert result.num_sequences == {"en": 48, "el": 48}


def test_classifier_separates_two_languages_with_disjoint_vocabularies(tmp_path):
    model = expand(tiny_model(**WIDE), [1, 1, 1], ["en"], ["el"])
    insert_classifiers(model, [0, 2])
    settings = Stage2Settings(learning_rate=5e-2, max_steps=40, classifier_coef=1.0, **QUICK)
    train_stage2(model, {"en": old_language(64)}, {"el": new_language(64)}, settings, tmp_path)

    stats = routing_statistics(model, {"en": old_language(8, seed=1), "el": new_language(8, seed=1)}, ["en"])
    with_classifier = stats[stats["layer"].isin([0, 2])]
    assert (with_classifier["classifier_accuracy"] > 0.9).all(), with_classifier
    assert stats[stats["layer"] == 1]["classifier_accuracy"].isna().all()


def test_interrupted_stage_resumes_to_the_uninterrupted_result(tmp_path):
    data = {"el": new_language(32)}
    settings = Stage1Settings(learning_rate=1e-2, max_steps=6, per_device_batch_size=4, save_steps=2, logging_steps=2)
    fresh_model = lambda: expand(tiny_model(), [2, 1, 1], ["en"], ["el"])  # noqa: E731
    uninterrupted = train_stage1(fresh_model(), data, settings, tmp_path / "uninterrupted")

    with pytest.raises(KeyboardInterrupt):
        train_stage1(fresh_model(), data, settings, tmp_path / "interrupted", [StopAfterStep(3)])
    steps_run = []
    record_steps = MetricsCallback(lambda logs, step, max_steps: steps_run.append(step))
    resumed = train_stage1(fresh_model(), data, settings, tmp_path / "interrupted", [record_steps])

    assert resumed.resumed_from.name == "checkpoint-2"
    assert min(steps_run) > 2, "the resumed run started over"
    assert resumed.global_step == uninterrupted.global_step == 6
    expected = load_file(uninterrupted.model_dir / "model.safetensors")
    actual = load_file(resumed.model_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name  # bitwise: same data order, RNG and optimizer state


def test_train_causal_lm_lowers_loss_and_reports_loss_curves(tmp_path):
    model = tiny_model()
    held_out = new_language(16, seed=1)
    loss_before = lm_loss(model, held_out)
    logged = []
    settings = TrainSettings(learning_rate=1e-2, max_steps=15, **QUICK)
    record = MetricsCallback(lambda metrics, step, max_steps: logged.append((step, metrics)))
    result = train_causal_lm(model, {"el": new_language(64)}, settings, tmp_path, [record])

    assert lm_loss(model, held_out) < 0.8 * loss_before
    curve = [(step, metrics["lm_loss"]) for step, metrics in logged if "lm_loss" in metrics]
    assert [step for step, _ in curve] == [5, 10, 15]
    assert result.final_metrics["lm_loss"] == curve[-1][1]


def test_a_metrics_callback_prints_each_log_step_once(tmp_path, capfd):
    """The demo's console: the reporter's line per log step, not also the Trainer's own log dict after it."""
    settings = TrainSettings(learning_rate=1e-2, max_steps=4, per_device_batch_size=4, save_steps=100, logging_steps=2)
    train_causal_lm(tiny_model(), {"el": new_language(16)}, settings, tmp_path / "plain")
    assert "{'loss': " in capfd.readouterr().out  # without a reporter the Trainer prints its dict
    report = MetricsCallback(lambda metrics, step, max_steps: print(f"base step {step}: {sorted(metrics)}"))
    train_causal_lm(tiny_model(), {"el": new_language(16)}, settings, tmp_path / "reported", [report])
    printed = capfd.readouterr().out
    assert "{'loss': " not in printed and "base step 2: " in printed and "base step 4: " in printed, printed


def test_routing_heatmap_is_written(tmp_path):
    model = expand(tiny_model(), [1, 0, 2], ["en"], ["el"])
    stats = routing_statistics(model, {"en": old_language(4), "el": new_language(4)}, ["en"], batch_size=3)
    assert sorted(stats["layer"].unique()) == [0, 2]
    assert stats["num_tokens"].eq(4 * 16).all()
    for load, experts in zip(stats["expert_load"], stats["num_experts"]):
        assert len(load) == experts and math.isclose(sum(load), 1.0, rel_tol=1e-6)
    path = plot_routing_heatmap(stats, tmp_path / "routing.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_mix_realises_the_old_fraction_within_the_data():
    old, new = [("old", i) for i in range(10)], [("new", i) for i in range(30)]
    mix = lambda fraction, seed=0: replay_mix(old, new, fraction, seed, language=lambda item: item[0])  # noqa: E731
    quarter = mix(0.25)
    assert (sum(kind == "old" for kind, _ in quarter), len(quarter)) == (10, 40)
    half = mix(0.5)
    assert (sum(kind == "old" for kind, _ in half), len(half)) == (10, 20)
    assert half == mix(0.5) != mix(0.5, seed=1)
    assert mix(0.0) == new and mix(1.0) == old


def test_replay_mix_is_balanced_per_language():
    old = [("en", i) for i in range(40)] + [("zh", i) for i in range(12)] + [("es", i) for i in range(30)]
    new = [("el", i) for i in range(50)] + [("hu", i) for i in range(20)]
    mixed = replay_mix(old, new, 0.5, seed=0, language=lambda item: item[0])
    counts = {language: sum(item[0] == language for item in mixed) for language in ("en", "zh", "es", "el", "hu")}
    assert counts == {"en": 12, "zh": 12, "es": 12, "el": 18, "hu": 18}  # 36 old (3 x the smallest), 36 new


def test_collator_marks_padding_with_ignore_index():
    features = [
        {"input_ids": torch.tensor([5, 6, 7]), "language_label": OLD},
        {"input_ids": torch.tensor([8, 9]), "language_label": NEW},
    ]
    batch = collate_sequences(features)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, 9, IGNORE_INDEX]]
    assert batch["language_labels"].tolist() == [[OLD, OLD, OLD], [NEW, NEW, IGNORE_INDEX]]


@pytest.mark.parametrize(
    ("settings_class", "values", "named"),
    [
        (TrainSettings, {"learning_rate": 0.0}, "learning_rate=0.0"),
        (Stage1Settings, {"learning_rate": -1e-4}, "learning_rate=-0.0001"),
        (Stage2Settings, {"replay_old_fraction": 1.5}, "replay_old_fraction=1.5"),
        (Stage2Settings, {"replay_old_fraction": -0.1}, "replay_old_fraction=-0.1"),
        (Stage1Settings, {"balance_coef": 0.1}, "balance_coef=0.1"),
        (TrainSettings, {"precision": "fp8"}, "precision='fp8'"),
    ],
)
def test_bad_settings_raise_layermoe_error_naming_the_value(settings_class, values, named):
    with pytest.raises(LayerMoEError, match=named):
        settings_class(**values)
    with pytest.raises(LayerMoEError, match=named):
        settings_class.model_validate(values)


def test_stage2_without_old_language_data_raises(tmp_path):
    model = expand(tiny_model(), [1, 1, 1], ["en"], ["el"])
    with pytest.raises(LayerMoEError, match="no old-language sequences"):
        train_stage2(model, {}, {"el": new_language(8)}, Stage2Settings(), tmp_path)


@pytest.mark.parametrize(
    ("sequences", "named"),
    [
        ({"el": torch.rand(4, 16)}, "torch.float32"),
        ({"el": torch.full((4, 16), 97)}, r"\[97, 97\]"),
        ({"el": torch.zeros(4, 1, dtype=torch.long)}, r"\(4, 1\)"),
    ],
)
def test_bad_sequences_raise_layermoe_error(tmp_path, sequences, named):
    model = expand(tiny_model(), [1, 1, 1], ["en"], ["el"])
    with pytest.raises(LayerMoEError, match=named):
        train_stage1(model, sequences, Stage1Settings(), tmp_path)
