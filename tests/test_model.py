"""Invariants of the expanded model (docs/design.md, 'Invariants worth testing')."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from layermoe_core import LayerMoEError, LayerMoEForCausalLM, expand, forced_old_routing, insert_classifiers, set_trainable
from layermoe_core.model.losses import load_balancing_loss

from .conftest import tiny_model


def perturb_new_experts(model: LayerMoEForCausalLM, seed: int = 0) -> None:
    """Make this round's experts and router rows differ, so routing actually matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.moe_blocks().values():
            if block.router is None:
                continue
            experts = block.new_experts[-1]
            experts.gate_up_proj.add_(0.2 * torch.randn(experts.gate_up_proj.shape, generator=gen))
            block.router.gate.weight.copy_(torch.randn(block.router.gate.weight.shape, generator=gen))


def test_forced_old_routing_reproduces_parent_logits(base_model, token_ids):
    parent_logits = base_model(token_ids).logits
    child = expand(copy.deepcopy(base_model), [2, 1, 3], ["en"], ["el"]).eval()
    perturb_new_experts(child)
    insert_classifiers(child, [0])
    assert not torch.allclose(child(token_ids).logits, parent_logits, atol=1e-3)  # routing matters
    with forced_old_routing(child):
        torch.testing.assert_close(child(token_ids).logits, parent_logits, atol=1e-5, rtol=0)


def test_fresh_copies_reproduce_parent_logits_under_any_routing(base_model, token_ids):
    parent_logits = base_model(token_ids).logits
    child = expand(copy.deepcopy(base_model), [1, 2, 1], ["en"], ["el"]).eval()
    with torch.no_grad():
        for block in child.moe_blocks().values():
            block.router.gate.weight.normal_()
    torch.testing.assert_close(child(token_ids).logits, parent_logits, atol=1e-5, rtol=0)


def test_layer_with_zero_new_experts_is_the_parents_layer(base_model):
    parent_layer = copy.deepcopy(base_model.model.layers[1])
    child = expand(base_model, [1, 0, 1], ["en"], ["el"])
    assert child.config.moe_layers == [0, 2]
    layer = child.causal_lm.model.layers[1]
    assert type(layer.mlp) is type(parent_layer.mlp)
    for (name, p), (_, q) in zip(layer.named_parameters(), parent_layer.named_parameters()):
        assert torch.equal(p, q), name


def test_save_then_load_gives_same_logits(base_model, token_ids, tmp_path):
    child = expand(base_model, [2, 0, 1], ["en"], ["el"]).eval()
    perturb_new_experts(child)
    insert_classifiers(child, [2])
    child.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code
    assert isinstance(reloaded, LayerMoEForCausalLM)
    assert reloaded.config.classifier_layers == [2]
    torch.testing.assert_close(reloaded(token_ids).logits, child(token_ids).logits, atol=0, rtol=0)


def test_stage1_step_changes_only_new_experts_and_routers(base_model, token_ids):
    child = expand(base_model, [2, 1, 1], ["en"], ["el"]).train()
    trainable = set(set_trainable(child, "stage1"))
    assert trainable and all(".new_experts." in n or n.endswith("mlp.routers.0.gate.weight") for n in trainable)
    before = {n: p.detach().clone() for n, p in child.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in child.parameters() if p.requires_grad], lr=1e-2)
    child(token_ids, labels=token_ids).loss.backward()
    optimizer.step()
    for name, param in child.named_parameters():
        if name in trainable and ".new_experts." in name:
            assert not torch.equal(param, before[name]), f"new expert {name} did not change"
        elif name not in trainable:
            assert torch.equal(param, before[name]), f"frozen {name} changed"


def test_second_round_freezes_earlier_experts_and_forced_routing_reproduces_parent(base_model, token_ids):
    child = expand(base_model, [1, 1, 1], ["en"], ["el"]).eval()
    perturb_new_experts(child, seed=1)
    child_logits = child(token_ids).logits
    grandchild = expand(child, [1, 0, 2], ["en", "el"], ["tr"]).eval()
    assert grandchild.config.expert_group_sizes(2) == [1, 1, 2]
    assert grandchild.config.languages == ["en", "el", "tr"]
    trainable = set_trainable(grandchild, "stage1")
    assert not any(".new_experts.0." in n for n in trainable), "round-1 experts must be frozen"
    assert not any("layers.1." in n for n in trainable), "layer 1 received no experts this round"
    perturb_new_experts(grandchild, seed=2)
    with forced_old_routing(grandchild):
        torch.testing.assert_close(grandchild(token_ids).logits, child_logits, atol=1e-5, rtol=0)


def test_stage2_trains_routers_and_classifiers_only(base_model):
    child = expand(base_model, [1, 1, 1], ["en"], ["el"])
    insert_classifiers(child, [1])
    trainable = set_trainable(child, "stage2")
    assert sorted(trainable) == sorted(
        [f"causal_lm.model.layers.{i}.mlp.routers.0.gate.weight" for i in range(3)]
        + ["causal_lm.model.layers.1.mlp.routers.0.classifier.weight", "causal_lm.model.layers.1.mlp.routers.0.classifier.bias"]
    )


def test_old_predicted_tokens_use_expert_zero_alone(base_model, token_ids):
    child = expand(base_model, [3, 0, 0], ["en"], ["el"]).eval()
    insert_classifiers(child, [0])
    block = child.moe_block(0)
    with torch.no_grad():
        block.router.classifier.bias.copy_(torch.tensor([10.0, -10.0]))  # everything predicted old
        block.router.gate.weight.normal_()
    hidden = torch.randn(11, 32)
    experts, weights = block.route(hidden)
    assert (experts[:, 0] == 0).all() and torch.equal(weights[:, 0], torch.ones(11))
    assert (weights[:, 1:] == 0).all() and (experts[:, 1:] == block.num_experts).all()  # spare slots: never computed


def test_topk_weights_sum_to_one(base_model):
    child = expand(base_model, [3, 1, 2], ["en"], ["el"], top_k=2)
    for block in child.moe_blocks().values():
        with torch.no_grad():
            block.router.gate.weight.normal_()
        experts, weights = block.route(torch.randn(13, 32))
        assert experts.shape == (13, 2)
        torch.testing.assert_close(weights.sum(-1), torch.ones(13))


def test_balance_loss_is_minimal_for_uniform_router():
    uniform = load_balancing_loss(torch.zeros(64, 4), top_k=2)
    torch.testing.assert_close(uniform, torch.tensor(2.0))  # k, as in Mixtral
    gen = torch.Generator().manual_seed(0)
    for scale in (0.5, 2.0, 8.0):
        assert load_balancing_loss(scale * torch.randn(64, 4, generator=gen), top_k=2) > uniform
    skewed = torch.zeros(64, 4)
    skewed[:, 0] = 5.0
    assert load_balancing_loss(skewed, top_k=2) > 3.0


def test_output_carries_router_logits_and_aux_loss(base_model, token_ids):
    child = expand(base_model, [1, 0, 2], ["en"], ["el"])
    out = child(token_ids, labels=token_ids)
    assert [t.shape for t in out.router_logits] == [(18, 2), (18, 3)]
    torch.testing.assert_close(out.loss, out.lm_loss + child.config.router_aux_loss_coef * out.aux_loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_serving_returns_the_wrapped_models_output_and_generates_as_it_does(family, dtype):
    """Without labels or recording (generation, evaluation) the forward hands back the wrapped causal LM's own
    output: the same logits, bit for bit, and the same greedy generation, padding included. The recorded
    path (every router on every token) gives the same logits up to float rounding, with this round's logits."""
    child = expand(tiny_model(family), [2, 0, 3], ["en"], ["el"]).eval()
    perturb_new_experts(child)
    insert_classifiers(child, [0, 2])
    child = child.to(dtype)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    with torch.inference_mode():
        served = child(ids, attention_mask=mask)
        wrapped = child.causal_lm(ids, attention_mask=mask)
        recorded = child(ids, attention_mask=mask, output_router_logits=True)
        generated = child.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        wrapped_generated = child.causal_lm.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert type(served) is type(wrapped)
    assert torch.equal(served.logits, wrapped.logits)
    assert torch.equal(generated, wrapped_generated)
    assert len(recorded.router_logits) == len(recorded.classifier_logits) == 2
    assert "cache" in wrapped.keys() or "past_key_values" in wrapped.keys()
    assert set(wrapped.keys()) <= set(recorded.keys())  # every field the wrapped model returns, its cache included
    tolerance = 3e-2 * recorded.logits.float().abs().max().item() if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(served.logits.float(), recorded.logits.float(), rtol=0, atol=tolerance)


@pytest.mark.parametrize(
    "allocation, top_k, message",
    [
        ([1, 1], 2, "has 2 entries but the model has 3 layers"),
        ([1, -1, 1], 2, "negative expert counts"),
        ([2, 1, 1], 4, "top_k=4 exceeds the experts in MoE layers"),
    ],
)
def test_bad_allocation_gives_clear_error(allocation, top_k, message):
    model = tiny_model()
    with pytest.raises(LayerMoEError, match=message):
        expand(model, allocation, ["en"], ["el"], top_k=top_k)
    assert not hasattr(model.model.layers[0].mlp, "gate"), "a refused expansion must not touch the model"


def test_unsupported_architecture_gives_clear_error():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(LayerMoEError, match="unsupported base architecture 'gpt2'"):
        expand(gpt2, [1, 1], ["en"], ["el"])


def test_classifier_on_dense_layer_gives_clear_error(base_model):
    child = expand(base_model, [1, 0, 1], ["en"], ["el"])
    with pytest.raises(LayerMoEError, match=r"classifier layers \[1\] received no new experts this round"):
        insert_classifiers(child, [1])
