"""`LayerMoEBlock`: the MLP of one decoder layer turned into a mixture of experts.

Experts: expert 0 is the parent's original MLP (frozen); each expansion round that gives this
layer experts appends a group of new ones (`StackedExperts`), copies of expert 0.

Routing is a tree with one `LayerMoERouter` per such round, newest last (the lifelong
invariant of docs/design.md):

    round r router ──new──> softmax top-k over every expert so far          (trained in round r)
         │
         └─old (classifier, or forced)──> round r-1 router ──new──> ...     (frozen: the parent's function)
                                              └─old──> ... ──> expert 0 alone, weight 1 (the dense layer)

A router without a classifier sends every token down its new path. So a token that this
round's classifier calls "old", or every token under `forced_old_routing`, goes through exactly
the parent's MoE function: the parent's routers and classifiers, frozen, over the parent's
frozen experts. Cutting the tree at an older round (`routed_rounds`, set by `pinned_language`)
gives that round's version's function in the same way; cut at round 0 the block is the dense layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LayerMoEError
from .experts import ExpertGroups, StackedExperts, host_dispatch, host_dispatch_applies

RouterInit = Literal["fresh", "parent"]
NEW_LABEL = 1  # classifier class of new-language tokens (losses.NEW); 0 is old
# Up to this many (token, classifier) decisions, an inference call compares the classifiers' logits on the host
# (a decoding step's few rows); beyond it (a prefill), tensor ops decide.
HOST_DECISIONS = 256

# Whether the running forward records router and classifier logits for the model output: a
# property of the call (set by the model around one forward), never state left on a module.
_RECORDING: ContextVar[bool] = ContextVar("layermoe_recording_routing", default=False)
# Inside `routes_read_once`: the inference route each block has read in the call, kept to the call's end.
_ROUTES_OF_THE_CALL: ContextVar[dict[LayerMoEBlock, InferenceRoute] | None] = ContextVar("layermoe_routes_of_the_call", default=None)


@contextlib.contextmanager
def recording_routing() -> Iterator[None]:
    """Inside, every router runs on every token, so its logits can be recorded even where no token uses it."""
    token = _RECORDING.set(True)
    try:
        yield
    finally:
        _RECORDING.reset(token)


@contextlib.contextmanager
def routes_read_once() -> Iterator[None]:
    """Inside, each block reads its inference route at its first call and keeps it to the end, without reading its
    key again: a generation's steps run on weights that nothing changes while it runs, and the key's cost grows with
    the rounds (`InferenceRoute`). `LayerMoEForCausalLM.generate` runs inside it."""
    token = _ROUTES_OF_THE_CALL.set({})
    try:
        yield
    finally:
        _ROUTES_OF_THE_CALL.reset(token)


class LayerMoERouter(nn.Module):
    """One round's routing in one layer: a linear gate over every expert that exists after the round.

    Softmax in fp32, then top-k; with k > 1 the k weights are renormalised to sum to 1, with
    k = 1 the weight is the router probability itself (Switch), so the LM loss reaches the gate.
    `classifier` (optional) predicts old (0) or new (1) per token from its hidden state.
    """

    classifier: nn.Linear | None

    def __init__(self, hidden_size: int, num_experts: int, num_old_experts: int, top_k: int):
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.register_module("classifier", None)  # a module slot from the start: `LayerMoEBlock._route_key` reads it there
        self.num_old_experts = num_old_experts  # the experts that existed before this router's round
        self.top_k = top_k

    def add_classifier(self, generator: torch.Generator | None = None) -> None:
        weight = self.gate.weight
        self.classifier = nn.Linear(weight.shape[1], 2, bias=True).to(weight)
        with torch.no_grad():
            self.classifier.weight.copy_(0.02 * torch.randn(self.classifier.weight.shape, generator=generator))
            self.classifier.bias.zero_()

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (N, d) -> router_logits (N, E), top-k weights (N, k) in fp32, top-k expert ids (N, k)."""
        router_logits = self.gate(tokens.to(self.gate.weight.dtype))  # (N, E)
        probs = torch.softmax(router_logits.float(), dim=-1)  # (N, E), fp32 as in the reference
        weights, ids = probs.topk(self.top_k, dim=-1)  # (N, k) each
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return router_logits, weights, ids

    def top_k_routing(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference: `forward`'s top-k weights (N, k) fp32 and expert ids (N, k), up to float rounding, in fewer ops.

        Softmax is monotone, so the top-k logits are the top-k probabilities; with k > 1 their
        renormalised probabilities are the softmax of the k logits alone. With k = 1 the weight is
        the probability over every expert, so that case takes `forward`.
        """
        if self.top_k == 1:
            _, weights, ids = self(tokens)
            return weights, ids
        # Through the module, not its weight: a dispatched model loads an offloaded gate in the module's own hook.
        logits, ids = self.gate(tokens.to(self.gate.weight.dtype)).float().topk(self.top_k, dim=-1)  # (N, k) each
        return torch.softmax(logits, dim=-1), ids

    def predicts_new(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the classifier's decision per token."""
        classifier = self.classifier
        if classifier is None:
            raise LayerMoEError("predicts_new needs a classifier; this router has none (insert_classifiers adds one)")
        return classifier(tokens.to(classifier.weight.dtype)).argmax(dim=-1) == NEW_LABEL


class InferenceRoute(NamedTuple):
    """The routing tree as the inference route asks it, for one state of its block (`LayerMoEBlock._route_key`).

    The key holds the tree cut, the id of every router and classifier, and each classifier tensor's (id, data_ptr,
    _version): an in-place change bumps a version; a replaced module or parameter, or moved data, changes an id or
    an address. `sources` keeps those objects and their data alive, so that no other object takes their ids or
    addresses. Writes through `.data` bypass the version counter, as they bypass autograd. Inside `routes_read_once`
    (a generation) the route read at a block's first call serves the rest of the call, its key unread.
    """

    key: tuple
    sources: tuple
    classified: list[LayerMoERouter]  # the routers that ask their classifier, newest first
    fallback: LayerMoERouter | None  # the newest router without a classifier; None: the dense layer
    weight: torch.Tensor | None  # (2R, d): the classifiers of `classified` stacked; None where one matmul cannot run them
    bias: torch.Tensor | None  # (2R,)


class LayerMoEBlock(nn.Module):
    def __init__(self, original_mlp: nn.Module, hidden_size: int, intermediate_size: int, hidden_act: str, top_k: int):
        super().__init__()
        self.original_mlp = original_mlp  # expert 0
        self.new_experts = nn.ModuleList()  # one StackedExperts per round that gave this layer experts
        self.routers = nn.ModuleList()  # one LayerMoERouter per such round, newest last
        self.group_sizes: list[int] = [1]  # experts per round, zeros included, expert 0 first
        self.top_k = top_k
        # Rounds whose routers route (None: all): the tree cut by `forced_old_routing` or `pinned_language`.
        self.routed_rounds: int | None = None
        self._shape = (hidden_size, intermediate_size, hidden_act)
        self._inference_route: InferenceRoute | None = None  # kept between calls while its key matches

    def __getstate__(self) -> dict:
        """Copies and pickles leave the kept inference route behind: its key names this block's own objects."""
        return {**super().__getstate__(), "_inference_route": None}

    @property
    def num_experts(self) -> int:
        return sum(self.group_sizes)

    @property
    def expanded_this_round(self) -> bool:
        """Whether the newest round gave this layer experts, and so a router that trains."""
        return self.group_sizes[-1] > 0

    @property
    def router(self) -> LayerMoERouter | None:
        """This round's router (the trainable one), or None if the round left the layer as it was."""
        return self.routers[-1] if self.expanded_this_round else None

    @property
    def num_old_experts(self) -> int:
        """Experts that existed before the newest round: the target of old-language tokens."""
        return self.num_experts - self.group_sizes[-1]

    def add_expert_group(self, num_new: int, generator: torch.Generator | None = None, router_init: RouterInit = "parent") -> None:
        """Append one round's experts (copies of expert 0) and the round's router over all experts.

        router_init "parent" (the default) copies the parent router's rows and starts each new
        expert's row at expert 0's row (plus N(0, 0.02^2) noise from `generator`), so the copies
        compete with the expert they copy; in a layer's first round there is no parent router and
        it is the same as "fresh". "fresh" (the reference's choice) draws every row from the noise.
        Zero-initialised new rows beside trained ones could never win a token.
        Old tokens keep their parent's routing either way, through the parent routers.
        """
        self.group_sizes.append(num_new)
        if num_new == 0:
            return
        hidden_size, intermediate_size, hidden_act = self._shape
        reference = next(self.original_mlp.parameters())
        experts = StackedExperts(num_new, hidden_size, intermediate_size, hidden_act).to(reference)
        experts.copy_from_mlp(self.original_mlp)
        self.new_experts.append(experts)
        num_old = self.num_experts - num_new
        router = LayerMoERouter(hidden_size, self.num_experts, num_old, self.top_k).to(reference)
        with torch.no_grad():
            weight = router.gate.weight  # (E, d)
            weight.copy_(0.02 * torch.randn(weight.shape, generator=generator))
            if router_init == "parent" and len(self.routers):
                parent = self.routers[-1].gate.weight  # (E_old, d)
                weight[:num_old] = parent
                weight[num_old:] += parent[0]
        self.routers.append(router)

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (N, d) -> expert ids (N, k) and fp32 weights (N, k), down the routing tree.

        Slots that carry no weight (a dense fall-through uses expert 0 alone) get the id
        `num_experts`, which the dispatch never computes.
        """
        routed = self._route(tokens, inference=False)
        return routed if routed is not None else self._dense_routing(tokens)

    def _dense_routing(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token to expert 0 alone, weight 1; the spare slots get the never-computed id `num_experts`."""
        num_tokens, k = tokens.shape[0], self.top_k
        ids = torch.full((num_tokens, k), self.num_experts, dtype=torch.long, device=tokens.device)
        ids[:, 0] = 0
        weights = torch.zeros(num_tokens, k, dtype=torch.float32, device=tokens.device)
        weights[:, 0] = 1.0
        return ids, weights

    def _route(self, tokens: torch.Tensor, inference: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`route`, or None where every token falls through to the dense layer (expert 0 alone, weight 1).

        Each token takes the newest router whose classifier calls it new; where none does, the newest router
        without a classifier (the routers before it are never reached), or else the dense layer.
        inference (no autograd, nothing recorded) asks every classifier of the layer in one matmul, reads the
        decisions (a decoding step's few tokens) or how many tokens each router takes in one host sync, and runs
        only the gates that take some, with `top_k_routing`: old-language text costs one classifier matmul and
        the dense layer. Training runs every router on every token, so a gradient-checkpointing recompute takes
        the path its forward took.
        """
        if self.routed_rounds == 0:  # the tree cut at round 0 (a base-language pin): the dense layer
            return None
        tree = None  # the inference route; training asks the router modules themselves
        if inference:
            tree = self._cached_inference_route()
            classified, fallback = tree.classified, tree.fallback
        else:
            classified, fallback = self._deciders()

        def top_k(router: LayerMoERouter | None) -> tuple[torch.Tensor, torch.Tensor]:
            """(ids, weights), (N, k) each; None: the dense layer."""
            if router is None:
                return self._dense_routing(tokens)
            weights, ids = router.top_k_routing(tokens) if inference else router(tokens)[1:]
            return ids, weights

        if not classified:
            return None if fallback is None else top_k(fallback)
        deciders = [*classified, fallback]
        if tree is not None and tokens.shape[0] * len(classified) <= HOST_DECISIONS:  # decoding: decided on the host
            choices = self._first_taking_new(tokens, tree)  # the one host sync
            used = sorted(set(choices))
            if len(used) < 2:  # one decider for every token (always, decoding one row), or no token
                decider = deciders[used[0]] if used else None
                return None if decider is None else top_k(decider)
            choice = torch.tensor(choices, device=tokens.device)  # (N,)
        else:
            takes_new = self._classify(tokens, tree, classified)  # (N, R), newest first
            choice = (takes_new.cumsum(dim=1) == 0).sum(dim=1)  # (N,) index of the first router taking it new; R: none
            used = list(range(len(deciders)))
            if inference:
                taken = torch.bincount(choice, minlength=len(deciders)).tolist()  # tokens per decider: the one host sync
                used = [index for index, count in enumerate(taken) if count]
                if used == [len(classified)] and fallback is None:  # every token takes the dense layer
                    return None
        ids, weights = top_k(deciders[used[-1]])
        for index in reversed(used[:-1]):  # newer deciders override older ones
            new_ids, new_weights = top_k(deciders[index])
            takes = (choice == index)[:, None]  # (N, 1)
            ids, weights = torch.where(takes, new_ids, ids), torch.where(takes, new_weights, weights)
        return ids, weights

    def _first_taking_new(self, tokens: torch.Tensor, tree: InferenceRoute) -> list[int]:
        """tokens (N, d) -> per token, the index in `tree.classified` of the first classifier that calls it new; R: none.

        Decoding's route: the classifiers' logits read on the host in one sync and compared there, as argmax
        compares them (the first of equal logits wins, NaN beats a number), instead of five more tensor ops.
        """
        num_classified = len(tree.classified)
        if tree.weight is None:
            rows = self._classify(tokens, None, tree.classified).tolist()  # the one host sync
            return [row.index(True) if True in row else num_classified for row in rows]
        if tokens.dtype != tree.weight.dtype:
            tokens = tokens.to(tree.weight.dtype)
        choices = []
        for logits in F.linear(tokens, tree.weight, tree.bias).tolist():  # the one host sync
            choice = num_classified
            for index in range(num_classified):
                old, new = logits[2 * index + 1 - NEW_LABEL], logits[2 * index + NEW_LABEL]
                if new > old or new != new and old == old:  # argmax picks NEW_LABEL
                    choice = index
                    break
            choices.append(choice)
        return choices

    def _classify(self, tokens: torch.Tensor, tree: InferenceRoute | None, classified: list[LayerMoERouter]) -> torch.Tensor:
        """tokens (N, d) -> (N, R) bool: each classifier's decision per token (`LayerMoERouter.predicts_new`).

        With the inference route's stacked classifiers, one matmul; else (training, whose recording hooks sit on
        the classifier modules, or an offloaded model, whose hooks load the weights) each classifier module runs.
        """
        if tree is not None and tree.weight is not None:
            logits = F.linear(tokens.to(tree.weight.dtype), tree.weight, tree.bias)  # (N, 2R)
        else:
            classifiers = [router.classifier for router in classified if router.classifier is not None]
            logits = torch.cat([classifier(tokens.to(classifier.weight.dtype)).float() for classifier in classifiers], dim=1)
        return logits.view(len(tokens), len(classified), 2).argmax(dim=-1) == NEW_LABEL

    def _deciders(self) -> tuple[list[LayerMoERouter], LayerMoERouter | None]:
        """The routers whose classifiers decide, newest first, down to the newest router without one (None: the
        dense layer); the routers before it are never reached."""
        classified: list[LayerMoERouter] = []
        for router in reversed(self._routed_routers()):
            if router.classifier is None:
                return classified, router
            classified.append(router)
        return classified, None

    def _route_key(self) -> tuple:
        """What the inference route depends on (`InferenceRoute`). Read through the modules' own dicts: this runs
        every decoding step, where `nn.Module.__getattr__` on every router and classifier tensor would cost more
        than the classifier matmul."""
        routers = list(self.routers)
        classifiers = [router._modules["classifier"] for router in routers]
        tensors = [tensor for classifier in classifiers if classifier is not None for tensor in classifier._parameters.values()]
        try:
            states: list = [(id(tensor), tensor.data_ptr(), tensor._version) for tensor in tensors]
        except RuntimeError:  # an inference tensor keeps no version (accelerate's offload loads them per call): never reuse
            states = [object()]
        return (self.routed_rounds, [id(router) for router in routers], [id(classifier) for classifier in classifiers], states)

    def _cached_inference_route(self) -> InferenceRoute:
        """The inference route for the block as it is now: the kept one while its key matches, else built anew;
        inside `routes_read_once`, the one read at the block's first call in it."""
        of_the_call = _ROUTES_OF_THE_CALL.get()
        if of_the_call is not None:
            if self not in of_the_call:
                of_the_call[self] = self._current_inference_route()
            return of_the_call[self]
        return self._current_inference_route()

    def _current_inference_route(self) -> InferenceRoute:
        key = self._route_key()
        tree = self._inference_route
        if tree is not None and tree.key == key:
            return tree
        classified, fallback = self._deciders()
        routers = list(self.routers)
        classifiers = [router.classifier for router in routers]
        every_tensor = [
            (tensor, tensor.detach()) for classifier in classifiers if classifier is not None for tensor in classifier.parameters()
        ]
        asked = [router.classifier for router in classified if router.classifier is not None]  # each has one (`_deciders`)
        tensors = [tensor for classifier in asked for tensor in (classifier.weight, classifier.bias)]
        weight = bias = None
        if classified and len({(t.dtype, t.device) for t in tensors}) == 1 and not tensors[0].is_meta:
            weight, bias = torch.cat(tensors[0::2]), torch.cat(tensors[1::2])  # (2R, d), (2R,)
        self._inference_route = InferenceRoute(key, (routers, classifiers, every_tensor), classified, fallback, weight, bias)
        return self._inference_route

    def _routed_routers(self) -> list[LayerMoERouter]:
        """The routers that route, oldest first: all, or those of the first `routed_rounds` rounds (the tree cut)."""
        routers = list(self.routers)
        if self.routed_rounds is None:
            return routers
        rounds = [index for index, size in enumerate(self.group_sizes[1:]) if size]  # each router's round, 0-based
        return [router for router, index in zip(routers, rounds) if index < self.routed_rounds]

    def expert_groups(self) -> ExpertGroups:
        """(module, first expert id, number of experts) for expert 0 and each non-empty round."""
        groups, first = [(self.original_mlp, 0, 1)], 1
        rounds = iter(self.new_experts)
        for size in self.group_sizes[1:]:
            if size:
                groups.append((next(rounds), first, size))
            first += size
        return groups

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden)  # (N, d)
        # The inference route only without autograd and recording (see `_route`).
        routed = self._route(tokens, inference=not torch.is_grad_enabled() and not _RECORDING.get())
        if routed is None:  # every token takes expert 0 alone, weight 1: exactly the parent's dense MLP
            return self.original_mlp(hidden_states).to(hidden_states.dtype)  # under autocast, as the routed path returns
        experts, weights = routed  # (N, k) each
        groups = self.expert_groups()
        if host_dispatch_applies(tokens, experts, groups):  # decoding on the CPU: experts.py's fast path
            return host_dispatch(tokens, experts, weights, groups).to(hidden_states.dtype).view(batch, seq, hidden)
        num_tokens, k = experts.shape

        # Sort the (token, slot) assignments by expert, so each expert sees one contiguous slice.
        # Zero-weight slots (spare slots of tokens that fell through to the dense layer, or a
        # weight that underflowed) get the extra id E, sort last and are never computed.
        keys = experts.reshape(-1).masked_fill(weights.reshape(-1) == 0, self.num_experts)  # (N*k,)
        sorted_keys, order = torch.sort(keys, stable=True)  # (N*k,) each
        expert_ids = torch.arange(self.num_experts, device=keys.device)
        ends = torch.searchsorted(sorted_keys, expert_ids, right=True).tolist()  # the one host sync
        counts = [end - start for start, end in zip([0, *ends[:-1]], ends)]  # (E,) assignments per expert
        order = order[: ends[-1]]  # (A,) the weighted assignments
        sorted_tokens = tokens[order // k]  # (A, d)

        segments = sorted_tokens.split([sum(counts[first : first + size]) for _, first, size in groups])
        outputs = [self.original_mlp(segments[0])]
        for (experts_of_round, first, size), segment in zip(groups[1:], segments[1:]):
            out = experts_of_round(segment, counts[first : first + size]) if len(segment) else segment
            outputs.append(out.to(outputs[0].dtype))  # trainable fp32 experts beside a bf16 parent

        # Put each output back in its (token, slot) place, then sum the k slots weighted, in fp32
        # and in slot order: deterministic (no atomics).
        expert_outputs = torch.cat(outputs)  # (A, d), in autocast's dtype under autocast
        # Slots without weight stay zero; where every slot carries weight, index_copy writes them all.
        slots = (
            expert_outputs.new_zeros(num_tokens * k, hidden)
            if len(order) < num_tokens * k
            else expert_outputs.new_empty(num_tokens * k, hidden)
        )
        slots = slots.index_copy(0, order, expert_outputs)  # (N*k, d)
        combined = (slots.view(num_tokens, k, hidden) * weights[..., None]).sum(dim=1)  # (N, d)
        return combined.to(hidden_states.dtype).view(batch, seq, hidden)
