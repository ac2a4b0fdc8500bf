"""`layermoe estimate`: the sizes it predicts against a tiny model's real ones (parameters exact, bytes within 5%),
and its per-device total against peak memory measured on CPU training runs (within 20%)."""

import json
import math
import random
import subprocess
import sys

import pytest
import torch
import yaml

from flows.cli import main
from layermoe_core.analysis.allocation import AllocationSettings, allocate_experts
from layermoe_core.model.checkpoints import load_model
from layermoe_core.model.surgery import expand, extend_vocabulary, insert_classifiers, set_trainable
from layermoe_core.training.estimate import DEFAULT_TFLOPS_PER_DEVICE, allocation_range, estimate_round, parent_config
from layermoe_core.training.launch import LauncherSettings
from layermoe_core.training.trainer import Stage1Settings, Stage2Settings, fp32_master_weights, train_stage1

from .conftest import TINY, tiny_model

ALLOCATION = [2, 0, 1]  # a dense layer in the middle
OLD, NEW = ["en", "zh"], ["el"]
SEQ_LEN, STAGE1_TOKENS, STAGE2_TOKENS = 16, 1_000, 400
BYTES_TOLERANCE = 0.05
PEAK_TOLERANCE = 0.20  # the per-device total against a measured peak RSS: allocator slack and transient buffers


def within(predicted: int, real: int) -> bool:
    return abs(predicted - real) <= BYTES_TOLERANCE * real


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def real_memory(model) -> tuple[int, int, int]:
    """Weights, gradients and AdamW state of `model` as training holds them, after one real step."""
    fp32_master_weights(model)
    model.train()
    batch = torch.randint(0, TINY["vocab_size"], (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    output = model(input_ids=batch, labels=batch)
    (output.loss + sum(logits.mean() for logits in output.classifier_logits or ())).backward()  # as Stage 2's classifier loss
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return nbytes(model.parameters()), nbytes(p.grad for p in trainable), nbytes(state)


@pytest.fixture(params=[("qwen2", torch.float32), ("llama", torch.bfloat16)], ids=["qwen2-fp32", "llama-bf16"])
def parent_dir(request, tmp_path):
    family, dtype = request.param
    tiny_model(family).to(dtype).save_pretrained(tmp_path / "parent")
    return tmp_path / "parent"


def estimate(parent_dir, stage1: Stage1Settings | None = None, **options):
    """The estimate of one round of the test plan; `options` are estimate_round's keywords (launcher, tflops_per_device)."""
    return estimate_round(
        parent_config(parent_dir),
        ALLOCATION,
        OLD,
        NEW,
        top_k=2,
        classifier_layers=1,
        seq_len=SEQ_LEN,
        stage1_tokens=STAGE1_TOKENS,
        stage2_tokens=STAGE2_TOKENS,
        stage1=stage1 or Stage1Settings(),
        stage2=Stage2Settings(),
        **options,
    )


def test_estimate_gives_the_real_parameter_counts_and_bytes_of_a_tiny_child(parent_dir, tmp_path):
    predicted = estimate(parent_dir)
    stage1, stage2 = predicted.stages

    parent = load_model(parent_dir, device="cpu")
    assert predicted.parent_params == sum(p.numel() for p in parent.parameters())
    child = expand(parent, ALLOCATION, OLD, NEW, top_k=2)
    assert stage1.trainable_params == sum(p.numel() for p in child.parameters() if p.requires_grad)
    weights, grads, optimizer = real_memory(child)
    assert within(stage1.weights_bytes, weights) and within(stage1.grads_bytes, grads) and within(stage1.optimizer_bytes, optimizer)
    child.save_pretrained(tmp_path / "stage1")  # as Stage 1 leaves it: in the parent's dtype

    child = load_model(tmp_path / "stage1", device="cpu")
    insert_classifiers(child, [0])
    set_trainable(child, "stage2")
    assert predicted.total_params == sum(p.numel() for p in child.parameters())
    assert predicted.added_params == predicted.total_params - predicted.parent_params
    assert stage2.trainable_params == sum(p.numel() for p in child.parameters() if p.requires_grad)
    child.save_pretrained(tmp_path / "child")
    assert within(predicted.child_bytes, (tmp_path / "child" / "model.safetensors").stat().st_size)
    weights, grads, optimizer = real_memory(child)
    assert within(stage2.weights_bytes, weights) and within(stage2.grads_bytes, grads) and within(stage2.optimizer_bytes, optimizer)


def test_estimated_steps_and_tokens_per_step_are_the_trainers(parent_dir, tmp_path):
    settings = Stage1Settings(num_epochs=1.5, per_device_batch_size=4, gradient_accumulation_steps=2, save_steps=100)
    (stage1, _) = estimate(parent_dir, stage1=settings).stages
    assert stage1.sequences == STAGE1_TOKENS // SEQ_LEN
    assert stage1.tokens_per_step == 4 * 2 * SEQ_LEN
    rows = {"el": torch.randint(0, TINY["vocab_size"], (stage1.sequences, SEQ_LEN), generator=torch.Generator().manual_seed(0))}
    model = expand(load_model(parent_dir, device="cpu"), ALLOCATION, OLD, NEW, top_k=2)
    assert train_stage1(model, rows, settings, tmp_path / "stage1").global_step == stage1.steps


def test_sharded_launchers_divide_what_they_shard(parent_dir, tmp_path):
    replicated = estimate(parent_dir, launcher=LauncherSettings(num_processes=4)).stages[0]
    for distributed, sharded in [
        ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2}}, {"weights", "grads", "optimizer"}),
        ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2, "fsdp_reshard_after_forward": False}}, {"grads", "optimizer"}),
        ({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2}}, {"grads", "optimizer"}),
        ({"distributed_type": "MULTI_GPU"}, set()),
    ]:
        config = tmp_path / "accelerate.yaml"
        config.write_text(yaml.safe_dump({**distributed, "num_processes": 4}))
        stage = estimate(parent_dir, launcher=LauncherSettings(config_file=config)).stages[0]
        for what in ("weights", "grads", "optimizer"):
            full = getattr(replicated, f"{what}_bytes")
            assert getattr(stage, f"{what}_bytes") == (math.ceil(full / 4) if what in sharded else full), (distributed, what)


def test_layermoe_allocations_fall_within_the_stated_range_and_reach_both_ends():
    settings = AllocationSettings(method="layermoe", delta=8)
    low, high = allocation_range(settings, 4)
    assert (low, high) == (8, 11)
    rng = random.Random(0)
    totals = {sum(allocate_experts([rng.uniform(0.05, 1.0) for _ in range(4)], settings).counts) for _ in range(300)}
    assert totals <= set(range(low, high + 1))
    assert sum(allocate_experts([0.5] * 4, settings).counts) == low  # equal shares of 2: no rounding
    assert sum(allocate_experts([1e3, 1e3, 1e3, 1e-3], settings).counts) == high  # three shares just above 0 each round up to 1


def test_estimate_command_prints_the_report_for_a_plan(parent_dir, tmp_path, capsys):
    plan = {
        "corpora": {lang: {"path": f"{lang}.txt"} for lang in OLD + NEW},
        "new_languages": NEW,
        "parent": {"hf_path": str(parent_dir), "languages": OLD},
        "allocation": {"method": "layermoe", "delta": 4},
        "launcher": {"num_processes": 2},
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    assert main(["estimate", "--plan", str(tmp_path / "plan.yaml")]) == 0
    report = capsys.readouterr().out
    assert "ceil rounding puts the total in [4, 6]" in report
    assert "== 4 new experts ==" in report and "== 6 new experts ==" in report
    assert "2 process(es), DDP (replicated)" in report and "stage2: trainable" in report
    assert "token store on disk" in report and "Trainer checkpoints on disk" in report and "with gradient checkpointing" in report
    assert f"time at {DEFAULT_TFLOPS_PER_DEVICE:g} TFLOP/s per device" in report
    assert main(["estimate", "--plan", str(tmp_path / "plan.yaml"), "--tflops-per-device", "1e-3"]) == 0
    assert "time at 0.001 TFLOP/s per device" in capsys.readouterr().out


def test_estimate_counts_the_vocabulary_rows_a_round_adds(parent_dir, tmp_path, capsys):
    added = 12
    predicted, dense_vocabulary = estimate(parent_dir, added_tokens=added), estimate(parent_dir)
    stage1, stage2 = predicted.stages

    child = expand(load_model(parent_dir, device="cpu"), ALLOCATION, OLD, NEW, top_k=2)
    extend_vocabulary(child, [[i, i + 1] for i in range(added)])  # as Stage 1 builds its child, then trains it
    hidden = child.config.base_config.hidden_size
    assert stage1.trainable_params == sum(p.numel() for p in child.parameters() if p.requires_grad)
    assert stage1.trainable_params == dense_vocabulary.stages[0].trainable_params + 2 * added * hidden  # an embedding and a head row
    # fp32 logits and log-softmax over the added columns too, for every token of a micro-batch
    tokens = Stage1Settings().per_device_batch_size * SEQ_LEN
    extra_logits = stage1.activations_without_checkpointing_bytes - dense_vocabulary.stages[0].activations_without_checkpointing_bytes
    assert extra_logits == 2 * tokens * added * 4
    child.save_pretrained(tmp_path / "stage1")

    child = load_model(tmp_path / "stage1", device="cpu")
    insert_classifiers(child, [0])
    set_trainable(child, "stage2")
    assert predicted.total_params == sum(p.numel() for p in child.parameters())
    assert stage2.trainable_params == sum(p.numel() for p in child.parameters() if p.requires_grad)
    child.save_pretrained(tmp_path / "child")
    assert within(predicted.child_bytes, (tmp_path / "child" / "model.safetensors").stat().st_size)

    plan = {
        "corpora": {lang: {"path": f"{lang}.txt"} for lang in OLD + NEW},
        "new_languages": NEW,
        "parent": {"hf_path": str(parent_dir), "languages": OLD},
        "allocation": {"method": "fixed", "fixed": ALLOCATION},
        "classifier_layer_count": 1,
        "vocabulary": {"extend": added},
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    assert main(["estimate", "--plan", str(tmp_path / "plan.yaml")]) == 0
    report = capsys.readouterr().out
    assert f"vocabulary: up to {added} new tokens" in report
    assert f"added {predicted.added_params:,}  total {predicted.total_params:,}" in report


def test_the_estimate_names_the_strategy_that_runs_and_refuses_a_config_the_launch_would_refuse(parent_dir, tmp_path, capsys):
    config = tmp_path / "accelerate.yaml"
    plan = {
        "corpora": {lang: {"path": f"{lang}.txt"} for lang in OLD + NEW},
        "new_languages": NEW,
        "parent": {"hf_path": str(parent_dir), "languages": OLD},
        "allocation": {"method": "uniform", "per_layer": 1},
        "launcher": {"config_file": str(config)},
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    config.write_text(yaml.safe_dump({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2}, "num_processes": 2}))
    assert main(["estimate", "--plan", str(tmp_path / "plan.yaml")]) == 0
    assert "2 process(es), FSDP2 full shard" in capsys.readouterr().out
    config.write_text(yaml.safe_dump({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 1}, "num_processes": 2}))
    assert main(["estimate", "--plan", str(tmp_path / "plan.yaml")]) == 2
    assert "layermoe runs FSDP2 only" in capsys.readouterr().err


def test_disk_time_and_totals_follow_the_plan(parent_dir):
    settings = Stage1Settings(per_device_batch_size=4, save_steps=5, save_total_limit=None)
    predicted = estimate(parent_dir, stage1=settings)
    stage1, _ = predicted.stages
    assert stage1.gathered_bytes == 0  # one process: nothing sharded, nothing gathered
    assert stage1.total_bytes == stage1.weights_bytes + stage1.grads_bytes + stage1.optimizer_bytes + stage1.activations_bytes
    assert stage1.activations_bytes == stage1.activations_without_checkpointing_bytes > stage1.activations_with_checkpointing_bytes
    assert stage1.checkpoints_kept == math.ceil(stage1.steps / 5)
    # uint16 token ids: Stage-1 tokens of the new language, Stage-2 replay of each old one
    assert predicted.token_store_bytes == 2 * (len(NEW) * STAGE1_TOKENS + len(OLD) * STAGE2_TOKENS)
    slower = estimate(parent_dir, settings, tflops_per_device=DEFAULT_TFLOPS_PER_DEVICE / 2).stages[0]
    assert slower.hours == pytest.approx(2 * stage1.hours) and stage1.device_hours == pytest.approx(stage1.hours)


@pytest.mark.parametrize(("hidden", "layers", "checkpointing"), [(256, 4, True), (384, 6, False), (512, 8, True)])
def test_the_per_device_total_is_within_20_percent_of_the_peak_memory_of_cpu_training(hidden, layers, checkpointing, tmp_path):
    """Stage 1 of an fp32 Llama child, two steps in a fresh process (tests/training_memory_probe.py)."""
    run = subprocess.run(
        [sys.executable, "-m", "tests.training_memory_probe", str(tmp_path), str(hidden), str(layers), str(int(checkpointing))],
        capture_output=True,
        text=True,
        check=True,
    )
    probe = json.loads(run.stdout.strip().splitlines()[-1])
    assert abs(probe["estimated_bytes"] - probe["measured_bytes"]) <= PEAK_TOLERANCE * probe["measured_bytes"], probe


def test_estimate_of_a_second_round_counts_a_layermoe_parent_exactly(tmp_path):
    first = expand(tiny_model("qwen2"), [1, 2, 1], ["en"], ["el"], top_k=2)
    insert_classifiers(first, [1])
    first.save_pretrained(tmp_path / "round1")
    predicted = estimate_round(
        parent_config(tmp_path / "round1"),
        [1, 0, 2],
        ["en", "el"],
        ["tr"],
        top_k=2,
        classifier_layers=1,
        seq_len=SEQ_LEN,
        stage1_tokens=STAGE1_TOKENS,
        stage2_tokens=STAGE2_TOKENS,
        stage1=Stage1Settings(),
        stage2=Stage2Settings(),
    )
    parent = load_model(tmp_path / "round1", device="cpu")
    assert predicted.parent_params == sum(p.numel() for p in parent.parameters())
    child = expand(parent, [1, 0, 2], ["en", "el"], ["tr"])
    assert predicted.stages[0].trainable_params == sum(p.numel() for p in child.parameters() if p.requires_grad)
    insert_classifiers(child, [0])
    set_trainable(child, "stage2")
    assert predicted.total_params == sum(p.numel() for p in child.parameters())
    assert predicted.stages[1].trainable_params == sum(p.numel() for p in child.parameters() if p.requires_grad)


def test_estimate_takes_a_lifelong_plan_and_estimates_the_round_asked_for(parent_dir, tmp_path, capsys):
    plan = {
        "corpora": {lang: {"path": f"{lang}.txt"} for lang in OLD + NEW + ["tr"]},
        "parent": {"hf_path": str(parent_dir), "languages": OLD},
        "rounds": [{"new_languages": NEW}, {"new_languages": ["tr"]}],
        "allocation": {"method": "uniform", "per_layer": 1},
    }
    (tmp_path / "lifelong.yaml").write_text(yaml.safe_dump(plan))
    assert main(["estimate", "--plan", str(tmp_path / "lifelong.yaml")]) == 0
    assert f"round 1 of 2: adds {', '.join(NEW)} to {', '.join(OLD)}" in capsys.readouterr().out

    first = expand(tiny_model("qwen2"), [1, 1, 1], OLD, NEW, top_k=2)
    first.save_pretrained(tmp_path / "round1")
    args = ["estimate", "--plan", str(tmp_path / "lifelong.yaml"), "--round", "2"]
    assert main(args) == 2
    assert "round 2's parent is a registry version; pass --parent-config" in capsys.readouterr().err
    assert main([*args, "--parent-config", str(tmp_path / "round1")]) == 0
    assert f"round 2 of 2: adds tr to {', '.join(OLD + NEW)}" in capsys.readouterr().out
