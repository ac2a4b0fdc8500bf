"""A model dispatched over devices (accelerate's big-model loading: `load_model(..., device_map=...)`)
measures what the same model measures on one device: similarity, the neuron signal, held-out
perplexity and routing statistics, for a dense parent and a LayerMoE child with some layers
offloaded to disk. CPU only: "disk" entries stand in for the GPUs and CPU memory a large model
would fill."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from accelerate.utils import compute_module_sizes
from prefect import flow

import tasks.common
from flows.plan import ExpansionPlan, load_plan
from layermoe_core import LayerMoEError, expand, insert_classifiers
from layermoe_core.analysis.routing_stats import routing_statistics
from layermoe_core.analysis.signals import neuron_signal, param_delta_signal
from layermoe_core.analysis.similarity import layer_similarity
from layermoe_core.data.corpus import load_sequences
from layermoe_core.evaluation.metrics import language_perplexity
from layermoe_core.model.checkpoints import load_model
from layermoe_core.model.inference import input_device
from tasks.analysis import measure_similarity
from tasks.evaluation import measure_routing

from .conftest import TINY, save_sequences, tiny_model

OLD, NEW = ["en"], ["el", "hu"]
ATOL = 1e-5  # fp32: the same kernels on the same CPU; only where tensors sit differs


def random_tokens(rows: int, seq_len: int, seed: int) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (rows, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sequences():
    return {language: random_tokens(4, 8, seed) for seed, language in enumerate(OLD + NEW)}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def saved(request, tmp_path_factory):
    """A dense parent and its LayerMoE child (new experts that differ from expert 0, classifiers in two layers), saved."""
    root = tmp_path_factory.mktemp(request.param)
    parent = tiny_model(request.param)
    parent.save_pretrained(root / "parent")
    child = expand(copy.deepcopy(parent), [2, 1, 2], OLD, NEW, seed=1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in child.moe_blocks().values():
            for experts in block.new_experts:
                for weight in (experts.gate_up_proj, experts.down_proj):
                    weight.add_(0.05 * torch.randn(weight.shape, generator=generator))
    insert_classifiers(child, [0, 2], seed=3)
    child.save_pretrained(root / "child")
    return root


def offloading_map(prefix: str) -> dict[str, str]:
    """Embedding, the last two decoder layers and the head on disk; the rest in CPU memory."""
    return {
        f"{prefix}model.embed_tokens": "disk",
        f"{prefix}model.layers.0": "cpu",
        f"{prefix}model.layers.1": "disk",
        f"{prefix}model.layers.2": "disk",
        f"{prefix}model.norm": "cpu",
        f"{prefix}model.rotary_emb": "cpu",
        f"{prefix}lm_head": "disk",
    }


MEASURES = {
    "similarity": lambda model, sequences: layer_similarity(model, sequences, OLD, NEW, batch_size=2),
    "neuron signal": lambda model, sequences: neuron_signal(model, sequences, OLD, NEW, 4, batch_size=2),
    "perplexity": lambda model, sequences: language_perplexity(model, sequences, batch_size=2),
    "routing": lambda model, sequences: routing_statistics(model, sequences, OLD, batch_size=2),
}


def assert_same_measures(dispatched, whole, sequences, names: list[str]) -> None:
    for name in names:
        pd.testing.assert_frame_equal(MEASURES[name](dispatched, sequences), MEASURES[name](whole, sequences), atol=ATOL, obj=name)


@pytest.mark.parametrize("side", ["parent", "child"])
def test_a_model_offloaded_to_disk_measures_what_it_measures_on_one_device(saved, side, sequences, tmp_path):
    whole = load_model(saved / side, device="cpu")
    prefix = "causal_lm." if side == "child" else ""
    dispatched = load_model(saved / side, device_map=offloading_map(prefix), offload_folder=tmp_path)
    assert "disk" in dispatched.hf_device_map.values()
    assert dispatched.get_input_embeddings().weight.is_meta  # offloaded: the first parameter cannot say where inputs go
    assert input_device(dispatched) == torch.device("cpu")
    names = ["similarity", "perplexity"] + (["routing"] if side == "child" else ["neuron signal"])
    assert_same_measures(dispatched, whole, sequences, names)
    with pytest.raises(LayerMoEError, match="param_delta fine-tunes a copy of the model, which needs it whole on one device"):
        param_delta_signal(dispatched, {"el": sequences["el"]})


def test_auto_device_map_within_max_memory_keeps_decoder_layers_whole_and_measures_the_same(saved, sequences, tmp_path: Path):
    whole = load_model(saved / "child", device="cpu")
    room = int(0.75 * compute_module_sizes(whole)[""])  # bytes: CPU memory for three quarters of the model
    dispatched = load_model(saved / "child", device_map="auto", max_memory={"cpu": room}, offload_folder=tmp_path)
    placed = dispatched.hf_device_map
    assert {"cpu", "disk"} == set(placed.values())
    assert not [name for name in placed if re.search(r"layers\.\d+\.", name)]  # no MoE block or attention apart from its layer
    assert_same_measures(dispatched, whole, sequences, ["perplexity", "routing"])


PLAN = """
new_languages: [el]
corpora:
  el: {{path: el.txt}}
placement:
  device_map: auto
  max_memory: {{cpu: {room}}}
"""


def write_plan(tmp_path: Path, text: str) -> Path:
    (tmp_path / "el.txt").write_text("καλημέρα κόσμε\n", encoding="utf-8")
    (tmp_path / "plan.yaml").write_text(text, encoding="utf-8")
    return tmp_path / "plan.yaml"


@pytest.mark.usefixtures("prefect_backend")
@pytest.mark.parametrize("saved", ["llama"], indirect=True)
def test_a_plans_placement_reaches_load_model_through_the_measuring_tasks(saved, sequences, tmp_path, monkeypatch):
    room = 3 * (saved / "parent" / "model.safetensors").stat().st_size // 4  # bytes: part of the parent, less of its child
    plan = load_plan(write_plan(tmp_path, PLAN.format(room=room)), ExpansionPlan)
    placement = plan.placement.with_offload_folder(tmp_path / "offload")  # as the round does, under its folder
    loads = []

    def recording_load_model(model_dir, **kwargs):
        model = load_model(model_dir, **kwargs)
        loads.append((Path(model_dir).name, kwargs, set(model.hf_device_map.values())))
        return model

    monkeypatch.setattr(tasks.common, "load_model", recording_load_model)
    tokens = save_sequences(sequences, tmp_path / "tokens.safetensors")
    fertility = pd.DataFrame({"language": OLD + NEW, "tokens_per_char": [0.3, 0.9, 0.4], "tokens_per_word": [1.5, 4.0, 2.0]})

    @flow
    def measuring():
        similarity = measure_similarity(saved / "parent", tokens, OLD, NEW, score="mean", batch_size=2, placement=placement)
        return similarity, measure_routing(saved / "child", tokens, OLD, fertility, batch_size=2, placement=placement)

    similarity, routing = measuring()
    wanted = {"device_map": "auto", "max_memory": {"cpu": room}, "offload_folder": tmp_path / "offload"}
    assert loads == [("parent", wanted, {"cpu", "disk"}), ("child", wanted, {"cpu", "disk"})]
    stored = load_sequences(tokens)  # the languages in the order the tasks read them
    pd.testing.assert_frame_equal(similarity, MEASURES["similarity"](load_model(saved / "parent", device="cpu"), stored), atol=ATOL)
    expected = MEASURES["routing"](load_model(saved / "child", device="cpu"), stored).merge(fertility, on="language")
    pd.testing.assert_frame_equal(routing, expected, atol=ATOL)  # each row beside its language's fertility


def test_max_memory_without_a_device_map_is_refused_with_the_fix(tmp_path):
    text = PLAN.format(room="20GiB").replace("  device_map: auto\n", "")
    with pytest.raises(LayerMoEError, match="placement: .*max_memory limits what device_map auto places.*set device_map: auto"):
        load_plan(write_plan(tmp_path, text), ExpansionPlan)


def test_a_size_that_is_not_a_size_is_refused_by_the_plan(tmp_path):
    with pytest.raises(LayerMoEError, match=r"max_memory\[.cpu.\]='lots' is not a size; give bytes .* or a string like 20GiB"):
        load_plan(write_plan(tmp_path, PLAN.format(room="lots")), ExpansionPlan)
