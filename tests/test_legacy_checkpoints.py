"""Checkpoints saved before the routing tree (one widened router per layer) are refused clearly, and convert exactly."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import layermoe_core.model.modeling_layermoe  # noqa: F401  (registers the layermoe Auto classes)
from layermoe_core import LayerMoEError
from layermoe_core.legacy import convert_legacy_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY = FIXTURES / "legacy_round2"  # two rounds with classifiers, saved by layermoe 0.1 (commit 687f9c7)


def test_a_legacy_checkpoint_is_refused_with_the_conversion_command():
    with pytest.raises(LayerMoEError, match=r"python -m layermoe_core.legacy SOURCE_DIR TARGET_DIR"):
        AutoModelForCausalLM.from_pretrained(LEGACY)


def test_a_converted_legacy_checkpoint_computes_what_the_old_code_computed(tmp_path):
    expected = load_file(FIXTURES / "legacy_round2_expected.safetensors")  # logits the old code gave
    converted = convert_legacy_checkpoint(LEGACY, tmp_path / "converted")
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=0)
    assert [len(model.moe_block(layer).routers) for layer in (0, 1, 2)] == [2, 1, 2]
    assert model.config.expansion_rounds[0]["classifier_layers"] == []  # the old code had dropped it
    with pytest.raises(LayerMoEError, match="already has routing_format 2"):
        convert_legacy_checkpoint(converted, tmp_path / "again")
