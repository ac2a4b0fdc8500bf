"""The lifelong invariant, through real rounds: old tokens see exactly their parent, in every round.

Three rounds on Llama and Qwen2 bases, each trained (Stage 1, classifiers, Stage 2), saved,
reloaded with `AutoModelForCausalLM.from_pretrained` and expanded again. The rounds cover a
layer that was dense in the parent, a layer whose parent had a classifier, and a layer that
gets no new experts. Plus the numerics of routing and of bf16 parents.
"""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from layermoe_core import expand, forced_old_routing, insert_classifiers
from layermoe_core.analysis.routing_stats import routing_statistics
from layermoe_core.model.losses import load_balancing_loss
from layermoe_core.training.trainer import Stage1Settings, Stage2Settings, train_stage1, train_stage2

from .conftest import tiny_model
from .test_training import QUICK, WIDE, cyclic_language

# Four synthetic languages with disjoint vocabularies (ids 0-96), so classifiers can separate them.
LANGUAGES = {"aa": (0, 24, 5), "bb": (24, 24, 7), "cc": (48, 24, 5), "dd": (72, 25, 7)}
# (new language, allocation, classifier layers) per round; the comment says what each round covers.
ROUNDS = [
    ("bb", [1, 0, 2], [0]),  # layer 1 stays dense
    ("cc", [1, 2, 0], [0, 1]),  # layer 1 was dense in the parent; layer 0's parent had a classifier; layer 2 unchanged
    ("dd", [2, 1, 1], [1, 2]),  # layer 2: the round-1 router (no round-2 one) becomes the parent path
]


def text(language: str, num_sequences: int, seed: int = 0) -> torch.Tensor:
    return cyclic_language(*LANGUAGES[language], num_sequences, seed=seed)


def mixed_batch() -> torch.Tensor:
    return torch.cat([text(lang, 2, seed=9) for lang in LANGUAGES])  # (8, 16), every language


def run_round(parent_dir, old: list[str], new: str, allocation, classifier_layers, out_dir):
    """One round as the flow runs it: load the parent, expand, Stage 1, classifiers, Stage 2, save."""
    parent = AutoModelForCausalLM.from_pretrained(parent_dir)
    child = expand(parent, allocation, old, [new], seed=len(old))
    stage1 = Stage1Settings(learning_rate=3e-2, max_steps=25, **QUICK)
    train_stage1(child, {new: text(new, 48)}, stage1, out_dir / "stage1")
    insert_classifiers(child, classifier_layers, seed=len(old))
    stage2 = Stage2Settings(learning_rate=5e-2, max_steps=80, lpr_coef=1.0, classifier_coef=2.0, **QUICK)
    result = train_stage2(
        child, {lang: text(lang, 24 + 8 * i) for i, lang in enumerate(old)}, {new: text(new, 48)}, stage2, out_dir / "stage2"
    )
    return result


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lifelong_chain(request, tmp_path_factory):
    """[base dir, round-1 dir, round-2 dir, round-3 dir] and each round's Stage-2 result."""
    root = tmp_path_factory.mktemp(f"chain-{request.param}")
    tiny_model(request.param, **WIDE).save_pretrained(root / "base")
    dirs, results, old = [root / "base"], [], ["aa"]
    for index, (new, allocation, classifier_layers) in enumerate(ROUNDS, start=1):
        result = run_round(dirs[-1], old, new, allocation, classifier_layers, root / f"round{index}")
        dirs.append(result.model_dir)
        results.append(result)
        old = old + [new]
    return dirs, results


@torch.no_grad()
def logits_of(model_dir, forced_old: bool = False) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if not forced_old:
        return model(mixed_batch()).logits
    with forced_old_routing(model):
        return model(mixed_batch()).logits


@pytest.mark.parametrize("round_index", [1, 2, 3])
def test_forced_old_routing_reproduces_the_trained_parent_in_every_round(lifelong_chain, round_index):
    dirs, _ = lifelong_chain
    parent, child = logits_of(dirs[round_index - 1]), logits_of(dirs[round_index])
    assert (child - parent).abs().max() > 1e-3, "training changed nothing, so the check below would be empty"
    torch.testing.assert_close(logits_of(dirs[round_index], forced_old=True), parent, atol=1e-5, rtol=0)


def test_every_round_keeps_every_earlier_router_and_classifier(lifelong_chain):
    dirs, _ = lifelong_chain
    model = AutoModelForCausalLM.from_pretrained(dirs[3])
    assert [len(model.moe_block(layer).routers) for layer in range(3)] == [3, 2, 2]
    has_classifier = [[router.classifier is not None for router in model.moe_block(layer).routers] for layer in range(3)]
    assert has_classifier == [[True, True, False], [True, True], [False, True]]


@pytest.mark.parametrize("round_index", [2, 3])
def test_every_old_language_is_classified_old_not_only_on_average(lifelong_chain, round_index):
    dirs, results = lifelong_chain
    model = AutoModelForCausalLM.from_pretrained(dirs[round_index])
    old = ["aa", "bb", "cc"][:round_index]
    new = ROUNDS[round_index - 1][0]
    stats = routing_statistics(model, {lang: text(lang, 8, seed=3) for lang in [*old, new]}, old)
    classified = stats.dropna(subset=["classifier_accuracy"])
    assert set(classified["layer"]) == set(ROUNDS[round_index - 1][2])
    assert (classified["classifier_accuracy"] >= 0.9).all(), classified[["layer", "language", "classifier_accuracy"]]
    replay = results[round_index - 1].num_sequences
    assert len({replay[lang] for lang in old}) == 1, f"replay not balanced per old language: {replay}"


def test_new_experts_are_the_top_expert_for_the_new_language_in_round_two(lifelong_chain):
    dirs, _ = lifelong_chain
    model = AutoModelForCausalLM.from_pretrained(dirs[2])
    stats = routing_statistics(model, {"cc": text("cc", 8, seed=3)}, ["aa", "bb"])
    expanded = stats[stats["layer"].isin([0, 1])]  # the layers round 2 gave experts
    assert (expanded["old_expert_fraction"] < 0.5).all(), expanded[["layer", "old_expert_fraction", "new_expert_weight"]]


# -- numerics ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("gap", [1000.0, -1000.0])
def test_a_huge_router_logit_gap_keeps_forward_and_backward_finite(family, gap):
    child = expand(tiny_model(family), [2, 1, 1], ["en"], ["el"])
    child = expand(child, [2, 1, 1], ["en", "el"], ["tr"])
    insert_classifiers(child, [0])
    with torch.no_grad():
        for block in child.moe_blocks().values():
            for router in block.routers:  # new experts' logits `gap` above (or below) the old ones'
                router.gate.weight.zero_()
                router.gate.weight[router.num_old_experts :, 0] = gap
        child.moe_block(0).router.classifier.bias.copy_(torch.tensor([0.0, 0.0]))
        child.moe_block(0).router.classifier.weight.normal_()  # some tokens old, some new
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    hidden = child.get_input_embeddings()(tokens).detach()
    hidden[..., 0] = 1.0  # so the gap reaches every token's logits
    child.train()
    out = child(inputs_embeds=hidden, labels=tokens)
    out.loss.backward()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    grads = {name: p.grad for name, p in child.named_parameters() if p.grad is not None}
    assert any("routers.1.gate" in name for name in grads)  # this round's routers got gradients
    assert all(torch.isfinite(grad).all() for grad in grads.values())


@pytest.mark.parametrize("with_mask", [False, True])
def test_balance_loss_equals_transformers_load_balancing_loss_func(with_mask):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * 7, 5, generator=generator)  # (batch * seq, experts)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    for top_k in (1, 2, 3):
        ours = load_balancing_loss(logits, top_k, mask.reshape(-1).bool() if with_mask else None)
        theirs = load_balancing_loss_func((logits,), num_experts=5, top_k=top_k, attention_mask=mask if with_mask else None)
        torch.testing.assert_close(ours, theirs)


def test_top1_routing_weight_is_the_router_probability_so_the_lm_loss_trains_the_router():
    child = expand(tiny_model(), [2, 2, 2], ["en"], ["el"], top_k=1).train()
    with torch.no_grad():
        for block in child.moe_blocks().values():
            block.new_experts[-1].down_proj.mul_(1.5)  # new experts differ from expert 0
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    child(tokens, labels=tokens).lm_loss.backward()
    gate_grads = [block.router.gate.weight.grad for block in child.moe_blocks().values()]
    assert all(grad is not None and grad.norm() > 1e-4 for grad in gate_grads), [g.norm() for g in gate_grads]


# -- bf16 parents -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bf16_parent_trains_in_fp32_master_weights_and_saves_bf16(family, precision, tmp_path):
    tiny_model(family, **WIDE).to(torch.bfloat16).save_pretrained(tmp_path / "parent")  # as Hub checkpoints are
    parent = AutoModelForCausalLM.from_pretrained(tmp_path / "parent", dtype="auto")
    assert parent.dtype == torch.bfloat16
    child = expand(parent, [2, 1, 2], ["aa"], ["bb"])
    before = {name: p.detach().float().clone() for name, p in child.named_parameters() if p.requires_grad}
    settings = Stage1Settings(learning_rate=5e-5, max_steps=4, precision=precision, **QUICK)
    result = train_stage1(child, {"bb": text("bb", 32)}, settings, tmp_path / "stage1")

    trained = dict(child.named_parameters())
    moved = sum(int((trained[name].detach() != value).sum()) for name, value in before.items())
    assert moved >= 0.99 * sum(value.numel() for value in before.values())
    assert all(trained[name].dtype == torch.float32 for name in before)  # master weights
    assert child.moe_block(0).original_mlp.down_proj.weight.dtype == torch.bfloat16  # frozen: the parent's dtype
    with safe_open(result.model_dir / "model.safetensors", "pt") as saved:
        assert {saved.get_slice(name).get_dtype() for name in saved.keys()} == {"BF16"}
    reloaded = AutoModelForCausalLM.from_pretrained(result.model_dir, dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    with torch.no_grad():
        logits = reloaded(mixed_batch()).logits
        with forced_old_routing(reloaded):
            forced = reloaded(mixed_batch()).logits
        parent_logits = parent(mixed_batch()).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(forced, parent_logits, atol=0.05, rtol=0)  # bf16: the parent up to rounding


def expanded_after_global_seed(global_seed: int, seed: int):
    model = tiny_model()
    torch.manual_seed(global_seed)
    child = expand(model, [2, 1, 1], ["en"], ["el"], seed=seed)
    insert_classifiers(child, [0, 2], seed=seed)
    return child


def test_expand_and_insert_classifiers_take_their_seed_explicitly():
    first, second, other = expanded_after_global_seed(1, 3), expanded_after_global_seed(2, 3), expanded_after_global_seed(1, 4)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.moe_block(0).router.gate.weight, other.moe_block(0).router.gate.weight)
    assert not torch.equal(first.moe_block(0).router.classifier.weight, other.moe_block(0).router.classifier.weight)


def test_parent_router_init_copies_the_parents_rows_and_starts_new_experts_at_expert_zeros_row():
    child = expand(tiny_model(), [1, 1, 1], ["en"], ["el"], seed=1)
    grandchild = expand(child, [2, 0, 1], ["en", "el"], ["tr"], seed=2, router_init="parent")
    parent_gate, new_gate = (router.gate.weight for router in grandchild.moe_block(0).routers)  # (2, d), (4, d)
    assert torch.equal(new_gate[:2], parent_gate)
    offsets = new_gate[2:] - parent_gate[0]  # the new experts compete with expert 0, which they copy
    assert 0.01 < offsets.std() < 0.03
    assert len(grandchild.moe_block(1).routers) == 1  # no experts this round: no new router


def test_new_prior_loss_is_minus_log_router_mass_on_new_experts_for_new_tokens_only():
    from layermoe_core.model.losses import IGNORE_INDEX, NEW, OLD, new_prior_loss

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [5.0, 5.0, 5.0]])  # (N, E), 1 old expert
    labels = torch.tensor([OLD, NEW, IGNORE_INDEX])
    probs = torch.softmax(logits[1], dim=-1)
    torch.testing.assert_close(new_prior_loss(logits, labels, num_old_experts=1), -torch.log(probs[1:].sum()))
    assert new_prior_loss(logits, torch.tensor([OLD, OLD, IGNORE_INDEX]), 1) == 0
