"""The MoE block's sorted, grouped dispatch equals a plain masked loop over experts.

The oracle below is the textbook MoE (as in transformers' Qwen2MoeExperts): for each expert,
find its (token, slot) pairs with a mask, run the expert, add the weighted output. Values and
gradients (input, every trainable weight, router) must match it, on CPU and, where present, CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache, LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from layermoe_core import expand, insert_classifiers
from layermoe_core.model import experts as expert_kernels
from layermoe_core.model.experts import check_kernel, grouped_linear, grouped_mm_runs
from layermoe_core.model.moe_block import LayerMoEBlock

from .tiny_models import TINY, tiny_model

HIDDEN, INTERMEDIATE, TOP_K = 32, 48, 2
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
DEVICES_AND_DTYPES = [
    ("cpu", torch.float32),
    pytest.param("cuda", torch.float32, marks=NO_CUDA),
    pytest.param("cuda", torch.bfloat16, marks=NO_CUDA),  # torch's grouped GEMM path
]


def assert_close(ours: torch.Tensor, reference: torch.Tensor, name: str, computed_in: torch.dtype | None = None) -> None:
    """Computed in fp32: torch's default tight tolerance; in bf16: 3% of the tensor's largest entry.

    computed_in: the dtype the matmuls ran in, by default the reference's (under autocast, bf16).
    """
    if (computed_in or reference.dtype) == torch.bfloat16:
        atol = 3e-2 * reference.float().abs().max().item()
        torch.testing.assert_close(ours.float(), reference.float(), rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
    else:
        torch.testing.assert_close(ours, reference, msg=lambda m: f"{name}: {m}")


def reference_forward(block: LayerMoEBlock, hidden_states: torch.Tensor) -> torch.Tensor:
    """Every expert runs on the tokens routed to it; weighted outputs are added per token."""
    tokens = hidden_states.reshape(-1, hidden_states.shape[-1])  # (N, d)
    experts, weights = block.route(tokens)  # (N, k) each
    out = torch.zeros_like(tokens)
    for expert in range(block.num_experts):
        token_idx, slot = torch.where(experts == expert)
        if len(token_idx):
            expert_out = expert_mlp(block, expert)(tokens[token_idx])
            out = out.index_add(0, token_idx, expert_out * weights[token_idx, slot, None].to(out.dtype))
    return out.view_as(hidden_states)


def expert_mlp(block: LayerMoEBlock, expert: int):
    """Expert `expert` of the block as a plain function of its own weight slices."""
    if expert == 0:
        return block.original_mlp
    group, first = next((g, first) for g, first, size in block.expert_groups()[1:] if first <= expert < first + size)
    gate_up_proj, down_proj = group.gate_up_proj[expert - first], group.down_proj[expert - first]

    def mlp(x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, gate_up_proj).chunk(2, dim=-1)
        return F.linear(group.act_fn(gate) * up, down_proj)

    return mlp


MLPS = {  # family: its dense MLP, expert 0
    "qwen2": lambda: Qwen2MLP(Qwen2Config(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, hidden_act="silu")),
    "llama": lambda: LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, hidden_act="silu")),
}


def stage1_block(group_sizes: list[int], classifier: bool, device: str, dtype=torch.float32, family: str = "qwen2") -> LayerMoEBlock:
    """A block after len(group_sizes) rounds, trained-looking, with only the newest round trainable."""
    torch.manual_seed(0)
    mlp = MLPS[family]()
    block = LayerMoEBlock(mlp, HIDDEN, INTERMEDIATE, "silu", TOP_K)
    for size in group_sizes:
        block.add_expert_group(size)
    router = block.routers[-1]
    if classifier:
        router.add_classifier()
    with torch.no_grad():
        for each_router in block.routers:
            each_router.gate.weight.normal_()
        for experts in block.new_experts:  # make the copies differ from expert 0 and each other
            experts.gate_up_proj.add_(0.3 * torch.randn_like(experts.gate_up_proj))
            experts.down_proj.add_(0.3 * torch.randn_like(experts.down_proj))
        if classifier:
            router.classifier.weight.normal_()  # about half the tokens predicted old
    block.requires_grad_(False)
    router.gate.requires_grad_(True)
    if classifier:
        router.classifier.requires_grad_(True)
    if group_sizes[-1]:
        block.new_experts[-1].requires_grad_(True)
    return block.to(device=device, dtype=dtype)


def forward_backward(block: LayerMoEBlock, forward, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Output and the gradient of every tensor that requires one (None where none arrived)."""
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = forward(block, x)
    out.backward(upstream)
    grads = {name: p.grad for name, p in block.named_parameters() if p.requires_grad}
    return {"output": out.detach(), "input": x.grad, **grads}


SCENARIOS = {  # name: (experts per round, classifier, forced-old routing)
    "round 1": ([3], False, False),
    "round 1, classifier": ([3], True, False),
    "round 1, forced old": ([3], False, True),
    "two rounds, empty middle round, classifier": ([2, 0, 3], True, False),
    "two rounds, forced old": ([2, 3], False, True),
}


@pytest.mark.parametrize("device, dtype", DEVICES_AND_DTYPES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_dispatch_matches_masked_loop_reference(scenario, device, dtype):
    group_sizes, classifier, forced_old = SCENARIOS[scenario]
    block = stage1_block(group_sizes, classifier, device, dtype)
    block.routed_rounds = len(block.group_sizes) - 2 if forced_old else None  # forced: cut below the newest round
    x = torch.randn(3, 11, HIDDEN, device=device, dtype=dtype)
    upstream = torch.randn_like(x)

    ours = forward_backward(block, LayerMoEBlock.__call__, x, upstream)
    reference = forward_backward(block, reference_forward, x, upstream)

    assert ours.keys() == reference.keys()
    assert ours[f"routers.{len(block.routers) - 1}.gate.weight"] is not None or forced_old
    assert ours["input"] is not None
    for name, grad in ours.items():
        if grad is None:  # a trainable round that got no weighted tokens (forced old) is skipped
            assert reference[name] is None or torch.count_nonzero(reference[name]) == 0, name
        else:
            assert_close(grad, reference[name], name)


class MatmulDtypes(TorchDispatchMode):
    """Records each matmul op that runs (below autocast) and the dtypes of its floating operands."""

    MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "_grouped_mm"}

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.MATMULS:
            self.ops.add(name)
            self.dtypes.update(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
        return func(*args, **(kwargs or {}))


def under_bf16_autocast(forward, device: str):
    """`forward` with autocast(bf16) around the forward pass only, as the Trainer's bf16 precision runs it."""

    def run(block: LayerMoEBlock, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16):
            return forward(block, x)

    return run


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NO_CUDA)])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_bf16_autocast_over_fp32_weights_runs_experts_in_bf16_and_matches_reference(scenario, device):
    """Mixed precision as Trainer(bf16=True) runs it: fp32 weights and input, autocast(bf16) forward.
    Every matmul, the experts' forward and backward included, must run in bf16; the output, fp32
    like the input, and the fp32 weight gradients must match the reference under the same autocast."""
    group_sizes, classifier, forced_old = SCENARIOS[scenario]
    block = stage1_block(group_sizes, classifier, device)  # fp32 weights
    block.routed_rounds = len(block.group_sizes) - 2 if forced_old else None  # forced: cut below the newest round
    x = torch.randn(3, 11, HIDDEN, device=device)
    upstream = torch.randn_like(x)

    with MatmulDtypes() as matmuls:
        ours = forward_backward(block, under_bf16_autocast(LayerMoEBlock.__call__, device), x, upstream)
    reference = forward_backward(block, under_bf16_autocast(reference_forward, device), x, upstream)

    assert matmuls.dtypes == {torch.bfloat16}
    if device == "cuda" and not forced_old:  # forced old: the new experts get no tokens, so no grouped GEMM
        assert "_grouped_mm" in matmuls.ops, "bf16 autocast on CUDA should take torch's grouped GEMM"
    assert ours["output"].dtype == reference["output"].dtype == torch.float32
    assert ours.keys() == reference.keys()
    for name, grad in ours.items():
        if grad is None:  # a trainable round that got no weighted tokens (forced old) is skipped
            assert reference[name] is None or torch.count_nonzero(reference[name]) == 0, name
            continue
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        assert_close(grad, reference[name], name, computed_in=torch.bfloat16)


@pytest.mark.parametrize("scenario", ["round 1, classifier", "round 1, forced old"])
def test_zero_weight_slots_of_old_routed_tokens_cost_no_expert_flops(scenario):
    group_sizes, classifier, forced_old = SCENARIOS[scenario]
    block = stage1_block(group_sizes, classifier, "cpu")
    block.routed_rounds = len(block.group_sizes) - 2 if forced_old else None  # forced: cut below the newest round
    x = torch.randn(1, 33, HIDDEN)
    _, weights = block.route(x[0])
    is_old = weights[:, 1] == 0
    assert is_old.any() and forced_old == is_old.all()  # old and, unless forced, new tokens too

    with FlopCounterMode(display=False) as counter:
        block(x)
    routing_flops = 0 if forced_old else 2 * 33 * HIDDEN * (block.num_experts + (2 if classifier else 0))
    weighted_slots = int((weights > 0).sum())
    assert counter.get_total_flops() - routing_flops == weighted_slots * 2 * 3 * HIDDEN * INTERMEDIATE


def test_frozen_expert_zero_costs_input_gradient_but_no_weight_gradient():
    block = stage1_block([3], classifier=False, device="cpu")
    x = torch.randn(2, 40, HIDDEN, requires_grad=True)
    upstream = torch.randn_like(x)
    experts, _ = block.route(x.reshape(-1, HIDDEN))
    tokens_of_expert_0 = int((experts == 0).sum())
    assert tokens_of_expert_0 > 0

    def backward_flops() -> int:
        out = block(x)
        with FlopCounterMode(display=False) as counter:
            out.backward(upstream)
        return counter.get_total_flops()

    frozen = backward_flops()
    assert all(p.grad is None for p in block.original_mlp.parameters())
    assert x.grad is not None
    block.original_mlp.requires_grad_(True)
    trainable = backward_flops()
    weight_gradient_flops = 2 * tokens_of_expert_0 * 3 * HIDDEN * INTERMEDIATE  # gate, up and down
    assert trainable - frozen == weight_gradient_flops


def per_expert_reference(tokens: torch.Tensor, weight: torch.Tensor, counts: list[int], chunks: int) -> tuple[torch.Tensor, ...]:
    return torch.cat([F.linear(rows, weight[e]) for e, rows in enumerate(tokens.split(counts))]).chunk(chunks, dim=-1)


@pytest.mark.parametrize("device, dtype", DEVICES_AND_DTYPES)
@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("upstream", ["dense", "broadcast, first chunk only"])
def test_grouped_linear_matches_per_expert_matmuls(device, dtype, chunks, upstream):
    """Including an expert without tokens (zero weight gradient), an unused output chunk, and a
    broadcast (zero-stride) upstream gradient, which torch's grouped_mm backward rejects."""
    counts = [5, 0, 16, 11]
    tokens = torch.randn(sum(counts), 32, device=device, dtype=dtype)
    weight = torch.randn(len(counts), 64, 32, device=device, dtype=dtype)
    results = []
    for fn in (grouped_linear, per_expert_reference):
        t, w = tokens.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        outs = fn(t, w, counts, chunks=chunks)
        if upstream == "dense":
            loss = sum((out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum() for out in outs)
        else:
            loss = outs[0].sum()
        loss.backward()
        results.append((torch.cat(outs, dim=-1), t.grad, w.grad))
    for name, ours, reference in zip(["output", "input gradient", "weight gradient"], *results):
        assert_close(ours, reference, name)
    assert torch.count_nonzero(results[0][2][1]) == 0
    if device == "cuda" and dtype == torch.bfloat16:
        assert grouped_mm_runs(tokens, weight), "bf16 on CUDA should take torch's grouped GEMM"


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_decoding_dispatch_on_the_host_equals_the_sorted_dispatch(scenario, batch, monkeypatch):
    """Inference with a token per row (decoding) groups the assignments on the host instead of sorting them.
    Same rows, same matmuls; only where a row sits in memory differs, which BLAS may round differently."""
    group_sizes, classifier, forced_old = SCENARIOS[scenario]
    block = stage1_block(group_sizes, classifier, "cpu")
    block.routed_rounds = len(block.group_sizes) - 2 if forced_old else None  # forced: cut below the newest round
    x = torch.randn(batch, 1, HIDDEN)
    with torch.inference_mode():
        few = block(x)
        monkeypatch.setattr(expert_kernels, "FEW_ASSIGNMENTS", 0)  # the sorted dispatch
        sorted_dispatch = block(x)
    torch.testing.assert_close(few, sorted_dispatch)
    torch.testing.assert_close(few, reference_forward(block, x).detach())


def classify(router, decision: str) -> None:
    """Set a router's classifier to send every token new, every token old, or (its random weights) some of each;
    "tied": both logits equal, which argmax, and so the classifier, reads as old."""
    with torch.no_grad():
        if decision != "mixed":
            router.classifier.weight.zero_()
            router.classifier.bias.copy_(torch.tensor({"new": [-10.0, 10.0], "old": [10.0, -10.0], "tied": [0.0, 0.0]}[decision]))


def two_rounds_with_classifiers(newest: str, older: str, family: str = "qwen2", dtype=torch.float32) -> LayerMoEBlock:
    """A block after two rounds (2 then 3 experts), each router with a classifier that decides as told."""
    block = stage1_block([2, 3], classifier=True, device="cpu", dtype=dtype, family=family)
    older_router = block.routers[0]
    older_router.add_classifier(torch.Generator().manual_seed(1))
    with torch.no_grad():
        older_router.classifier.weight.normal_()
    classify(older_router, older)
    classify(block.routers[1], newest)
    return block.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(MLPS))
@pytest.mark.parametrize(
    "newest, older",
    [("new", "mixed"), ("old", "mixed"), ("mixed", "mixed"), ("mixed", "new"), ("old", "old"), ("tied", "new"), ("tied", "tied")],
)
# decoding at batch 1 and 16 (decided on the host, host dispatch), prefills (sorted) decided on the host and by tensor ops
@pytest.mark.parametrize("shape", [(1, 1), (16, 1), (2, 40), (4, 40)])
def test_inference_route_and_output_equal_the_general_path(newest, older, family, dtype, shape):
    """Without autograd the block takes its inference route (routers newest first, top-k of the logits) and,
    for a few tokens, the host dispatch; experts, weights and output equal the general route's and the
    masked-loop reference's, up to float rounding."""
    block = two_rounds_with_classifiers(newest, older, family, dtype)
    x = torch.randn(*shape, HIDDEN, dtype=dtype)
    tokens = x.reshape(-1, HIDDEN)
    with torch.inference_mode():
        routed = block._route(tokens, inference=True)
        experts, weights = routed if routed is not None else block._dense_routing(tokens)
        general_experts, general_weights = block.route(tokens)
        ours = block(x)
        reference = reference_forward(block, x)
    assert (routed is None) == ({newest, older} <= {"old", "tied"})
    assert torch.equal(experts, general_experts)
    torch.testing.assert_close(weights, general_weights)
    assert_close(ours, reference, "output")


def flip_in_place(block: LayerMoEBlock) -> None:
    with torch.no_grad():
        for router in block.routers:
            router.classifier.weight.neg_()
            router.classifier.bias.neg_()


def flip_by_new_modules(block: LayerMoEBlock) -> None:
    for router in block.routers:
        flipped = torch.nn.Linear(HIDDEN, 2).to(router.classifier.weight)
        flipped.load_state_dict({name: -tensor for name, tensor in router.classifier.state_dict().items()})
        router.classifier = flipped


def flip_by_new_parameters(block: LayerMoEBlock) -> None:
    for router in block.routers:
        router.classifier.weight = torch.nn.Parameter(-router.classifier.weight.detach())
        router.classifier.bias = torch.nn.Parameter(-router.classifier.bias.detach())


def flip_by_data(block: LayerMoEBlock) -> None:
    for router in block.routers:
        router.classifier.weight.data = -router.classifier.weight.data
        router.classifier.bias.data = -router.classifier.bias.data


def flip_by_state_dict(block: LayerMoEBlock) -> None:
    flipped = {name: -tensor if ".classifier." in name else tensor for name, tensor in block.state_dict().items()}
    block.load_state_dict(flipped)


CLASSIFIER_CHANGES = {  # name: a change that reverses every classifier's decisions
    "weights negated in place": flip_in_place,
    "classifier modules replaced": flip_by_new_modules,
    "parameters replaced": flip_by_new_parameters,
    "parameter data replaced": flip_by_data,
    "state dict loaded": flip_by_state_dict,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(MLPS))
@pytest.mark.parametrize("change", list(CLASSIFIER_CHANGES))
@pytest.mark.parametrize("num_tokens", [8, 400])  # decided on the host, and by tensor ops
def test_the_inference_route_kept_between_calls_follows_every_change_to_a_classifier(change, num_tokens, family, dtype):
    """The inference route keeps the layer's classifiers stacked between calls; after any change to them it
    decides as the general route does, which runs each classifier module afresh, and as a block built fresh."""
    block = two_rounds_with_classifiers("mixed", "mixed", family, dtype)
    tokens = torch.randn(num_tokens, HIDDEN, dtype=dtype, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        served_before, _ = block._route(tokens, inference=True)
    CLASSIFIER_CHANGES[change](block)
    fresh = copy.deepcopy(block)  # a copy keeps no route: it builds its own
    with torch.inference_mode():
        served, weights = block._route(tokens, inference=True)
        general, general_weights = block.route(tokens)
        fresh_served, fresh_weights = fresh._route(tokens, inference=True)
        block.routed_rounds = 1  # the tree cut at the older round: its classifier alone decides
        cut_served, _ = block._route(tokens, inference=True)
        cut_general, _ = block.route(tokens)
    assert not torch.equal(served, served_before)  # the change reversed decisions, so a stale route would show
    assert torch.equal(served, general)
    torch.testing.assert_close(weights, general_weights)
    assert torch.equal(served, fresh_served) and torch.equal(weights, fresh_weights)
    assert torch.equal(cut_served, cut_general) and not torch.equal(cut_served, served)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_served_model_routes_by_classifiers_changed_between_two_forwards(family, dtype):
    """After an in-place change to every classifier, the next forward (a prefill and a one-token decoding step)
    and the next generation route as a copy of the changed model, which keeps no route, and not as before."""
    child = three_versions_served(family, dtype)
    with torch.no_grad():
        before = served(child)
        for block in child.moe_blocks().values():
            for router in block.routers:
                if router.classifier is not None:
                    router.classifier.weight.neg_()
                    router.classifier.bias.neg_()
        after = served(child)
        expected = served(copy.deepcopy(child))  # a copy keeps no route: it builds its own
    for now, old, new in zip(after, before, expected):
        assert torch.equal(now, new)
        assert not torch.equal(now, old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_served_model_routes_by_the_classifier_tensors_a_hook_installs_for_each_layers_forward(family, dtype):
    """FSDP2 and accelerate's offload put a layer's live tensors in place in a hook just before the layer runs, and
    take them away after: the route is the one of the tensors the layer runs with, not of those found between
    forwards."""
    child = three_versions_served(family, dtype)
    with torch.no_grad():
        expected = served(negated_classifiers(copy.deepcopy(child)))
        placeholders = {}
        for block in child.moe_blocks().values():
            live = negated_classifiers(copy.deepcopy(block))

            def install(module, args, live=live):
                for router, live_router in zip(module.routers, live.routers):
                    if router.classifier is not None:
                        placeholders[router] = dict(router.classifier._parameters)
                        router.classifier._parameters.update(live_router.classifier._parameters)

            def take_away(module, args, output):
                for router in module.routers:
                    if router in placeholders:
                        router.classifier._parameters.update(placeholders.pop(router))

            block.register_forward_pre_hook(install)
            block.register_forward_hook(take_away)
        hooked = served(child)
    for now, new in zip(hooked, expected):
        assert torch.equal(now, new)
    assert not placeholders


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generation_reads_each_layers_route_once_and_decodes_as_the_checked_route(family, dtype):
    """`generate` reads each layer's routing tree at its first step and keeps it for the call: its tokens and
    logits equal a greedy loop of forwards, each of which reads the route afresh; a change to every classifier
    made during the call is not seen until the next call, which follows it."""
    child = three_versions_served(family, dtype)
    prompt = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    steps = 5

    def generated(model, processors=()):
        out = model.generate(
            prompt,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            logits_processor=list(processors),
        )
        return out.sequences, torch.stack(out.logits)

    def negate_after_the_first_step(input_ids, scores):
        if input_ids.shape[1] == prompt.shape[1]:
            negated_classifiers(child)
        return scores

    with torch.no_grad():
        sequences, logits = generated(child)
        cache, tokens, looped = DynamicCache(), prompt, []
        for _ in range(steps):  # greedy forwards over the cache: every step reads the route afresh
            step = tokens if not looped else tokens[:, -1:]
            looped.append(child(step, cache=cache, use_cache=True).logits[:, -1])
            tokens = torch.cat([tokens, looped[-1].argmax(-1, keepdim=True)], dim=1)
        _, changed_during = generated(child, [negate_after_the_first_step])
        _, changed_after = generated(child)
        _, expected_after = generated(copy.deepcopy(child))  # a copy keeps no route: it builds its own
    assert torch.equal(tokens, sequences)
    assert torch.equal(torch.stack(looped).float(), logits)
    assert torch.equal(changed_during, logits)  # the call ran on the routes of its first step
    assert torch.equal(changed_after, expected_after) and not torch.equal(changed_after, logits)


def three_versions_served(family: str, dtype: torch.dtype):
    """A base and two rounds (classifiers in layers 0 and 2), the new experts perturbed so routing shows."""
    child = expand(expand(tiny_model(family), [1, 1, 1], ["en"], ["el"]), [1, 0, 1], ["en", "el"], ["hu"])
    insert_classifiers(child, [0, 2], seed=1)
    with torch.no_grad():
        for name, param in child.named_parameters():
            if "new_experts" in name:  # trained-looking experts: where a token goes changes what comes out
                param.add_(0.3 * torch.randn_like(param))
    return child.to(dtype).eval()


def negated_classifiers(module):
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".classifier." in name or name.startswith("classifier."):
                param.neg_()
    return module


def served(model) -> list[torch.Tensor]:
    """Logits of a prefill, of a one-token step, and of each step of a greedy generation."""
    prompt = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return [model(prompt).logits, model(prompt[:1, :1]).logits, torch.stack(generated.logits)]


def test_inference_runs_no_router_that_no_token_reaches():
    """Every token classified old: the block computes the classifier and expert 0, not this round's router.
    With autograd on (training, where the LPR loss reads the router's logits) the router still runs."""
    block = stage1_block([3], classifier=True, device="cpu")
    classify(block.router, "old")
    x = torch.randn(1, 33, HIDDEN)
    classifier_flops, mlp_flops = 2 * 33 * HIDDEN * 2, 2 * 33 * 3 * HIDDEN * INTERMEDIATE
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        out = block(x)
    assert counter.get_total_flops() == classifier_flops + mlp_flops
    assert torch.equal(out, block.original_mlp(x).detach())
    with FlopCounterMode(display=False) as counter:
        block(x)
    assert counter.get_total_flops() == classifier_flops + mlp_flops + 2 * 33 * HIDDEN * block.num_experts


def test_inference_runs_no_older_router_when_the_newest_classifier_takes_every_token():
    """The newest classifier sends every token new: the older round's gate decides nothing and does not run (its
    classifier runs, in the layer's one classifier matmul). With autograd on, every router runs on every token."""
    block = two_rounds_with_classifiers(newest="new", older="mixed")
    x = torch.randn(1, 33, HIDDEN)
    classifiers_flops = 2 * 33 * HIDDEN * 2 * 2  # both rounds' classifiers
    newest_gate_flops = 2 * 33 * HIDDEN * block.num_experts
    older_gate_flops = 2 * 33 * HIDDEN * block.routers[0].gate.out_features
    expert_flops = 2 * 33 * block.top_k * 3 * HIDDEN * INTERMEDIATE
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        block(x)
    assert counter.get_total_flops() == classifiers_flops + newest_gate_flops + expert_flops
    with FlopCounterMode(display=False) as counter:
        block(x)
    assert counter.get_total_flops() == classifiers_flops + newest_gate_flops + older_gate_flops + expert_flops


@pytest.mark.parametrize("kernel", ["loop", "grouped_mm", "transformers:grouped_mm", "transformers:batched_mm"])
def test_every_expert_kernel_matches_the_masked_loop_and_trains_no_frozen_weight(kernel):
    block = stage1_block([2, 3], classifier=False, device="cpu")
    for experts in block.new_experts:
        experts.kernel = kernel
    x = torch.randn(2, 9, HIDDEN)
    upstream = torch.randn_like(x)
    ours = forward_backward(block, LayerMoEBlock.__call__, x, upstream)
    reference = forward_backward(block, reference_forward, x, upstream)
    assert ours.keys() == reference.keys()
    for name, grad in ours.items():
        assert_close(grad, reference[name], name)
    assert block.new_experts[0].gate_up_proj.grad is None and block.new_experts[0].down_proj.grad is None  # the frozen round


def test_an_unknown_expert_kernel_names_the_choices():
    with pytest.raises(ValueError, match="transformers:grouped_mm"):
        check_kernel("transformers:no_such_kernel")
