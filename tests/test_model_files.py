"""The one rule for model directories (safetensors only, no pickles, in any case) and the one architecture check."""

from __future__ import annotations

import json

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from layermoe_core import LayerMoEError, expand
from layermoe_core.model.checkpoints import load_model
from layermoe_core.model.files import list_model_files, parameter_count
from layermoe_core.model.surgery import count_parameters
from tasks.parent import check_expandable

from .conftest import tiny_model


@pytest.fixture
def model_dir(tmp_path):
    tiny_model().save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "weights.pickle", "WEIGHTS.PICKLE", "optimizer.PT", "extra.Pkl"])
def test_a_model_dir_holding_a_pickle_in_any_case_is_refused_by_loading_and_by_the_parent_check(model_dir, pickle_name):
    (model_dir / pickle_name).write_bytes(b"not really a pickle")
    with pytest.raises(LayerMoEError, match=rf"pickle files \['{pickle_name}'\]"):
        load_model(model_dir, device="cpu")
    with pytest.raises(LayerMoEError, match=rf"pickle files \['{pickle_name}'\]"):
        check_expandable(model_dir)


def test_a_model_dir_without_safetensors_weights_is_refused(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(LayerMoEError, match=r"lacks \['\*\.safetensors'\]"):
        load_model(model_dir, device="cpu")


def test_parameter_count_from_the_safetensors_headers_is_the_models_own(model_dir):
    model = tiny_model()
    assert parameter_count(model_dir, list_model_files(model_dir)) == count_parameters(model) > 0


def test_the_parent_check_refuses_an_unsupported_architecture_from_its_config_alone(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(LayerMoEError, match=r"unsupported base architecture 'gpt2' in .*gpt2"):
        check_expandable(tmp_path / "gpt2")


def test_the_parent_check_and_the_surgery_refuse_a_biased_mlp_alike(tmp_path):
    biased = tiny_model("llama", mlp_bias=True)
    biased.save_pretrained(tmp_path / "biased")
    with pytest.raises(LayerMoEError, match=r"MLPs with biases"):
        check_expandable(tmp_path / "biased")
    with pytest.raises(LayerMoEError, match=r"MLPs with biases"):
        expand(biased, [1, 1, 1], ["en"], ["el"])


def test_the_parent_check_accepts_an_expanded_model_and_its_base(model_dir, tmp_path):
    check_expandable(model_dir)
    expand(tiny_model(), [1, 0, 1], ["en"], ["el"]).save_pretrained(tmp_path / "child")
    check_expandable(tmp_path / "child")


def test_a_checkpoint_without_the_routing_tree_format_is_refused_when_it_loads(tmp_path):
    expand(tiny_model(), [1, 0, 1], ["en"], ["el"]).save_pretrained(tmp_path / "child")
    config = json.loads((tmp_path / "child" / "config.json").read_text())
    assert config["routing_format"] == 2
    del config["routing_format"]
    (tmp_path / "child" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LayerMoEError, match=r"routing_format=None; layermoe loads only routing_format 2"):
        load_model(tmp_path / "child", device="cpu")
