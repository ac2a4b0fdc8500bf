"""The auxiliary losses of LayerMoE, as pure functions of router and classifier logits.

All take per-layer logits flattened over (batch, seq) and an optional `token_mask`
(N,) that drops padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
OLD, NEW = 0, 1  # language labels per token; IGNORE_INDEX for padding


def load_balancing_loss(router_logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral balance loss of one layer: E * sum_e f_e * P_e.

    f_e is the share of tokens that pick expert e among their top k (summing to k over
    experts), P_e the mean router probability of e: transformers' `load_balancing_loss_func`
    on one layer. It equals k for a uniform router and grows as routing concentrates.
    router_logits: (N, E).
    """
    num_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)  # (N, E)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).float().sum(1)  # (N, E)
    if token_mask is not None:
        probs, chosen = probs[token_mask], chosen[token_mask]
    tokens_per_expert = chosen.mean(0)  # f_e, sums to k
    mean_prob = probs.mean(0)  # P_e
    return num_experts * (tokens_per_expert * mean_prob).sum()


def lpr_loss(router_logits: torch.Tensor, language_labels: torch.Tensor, num_old_experts: int) -> torch.Tensor:
    """Language-prior routing loss: -log P(old experts) for old-language tokens.

    Uses log-probabilities of the router softmax. (The reference applies cross-entropy to
    the probabilities themselves, a double softmax; this is the intended quantity.) In round
    1 the old experts are expert 0 alone. router_logits: (N, E), language_labels: (N,).
    """
    is_old = language_labels == OLD
    if not is_old.any():
        return router_logits.new_zeros(())
    log_probs = torch.log_softmax(router_logits[is_old].float(), dim=-1)  # (N_old, E)
    return -torch.logsumexp(log_probs[:, :num_old_experts], dim=-1).mean()


def new_prior_loss(router_logits: torch.Tensor, language_labels: torch.Tensor, num_old_experts: int) -> torch.Tensor:
    """The mirror of LPR for new-language tokens: -log P(this round's experts).

    Not in the papers. In a lifelong round the new experts start as copies of the dense MLP beside
    earlier rounds' trained experts, which win the new languages' tokens at first; without a push
    the new experts get few tokens, learn little, and Stage 2's LPR then folds all routing onto
    old experts (measured on the demo: docs/results.md). router_logits: (N, E), labels: (N,).
    """
    is_new = language_labels == NEW
    if not is_new.any():
        return router_logits.new_zeros(())
    log_probs = torch.log_softmax(router_logits[is_new].float(), dim=-1)  # (N_new, E)
    return -torch.logsumexp(log_probs[:, num_old_experts:], dim=-1).mean()


def classifier_loss(classifier_logits: torch.Tensor, language_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the old/new classifier. classifier_logits: (N, 2), labels: (N,)."""
    if not (language_labels != IGNORE_INDEX).any():
        return classifier_logits.new_zeros(())
    return F.cross_entropy(classifier_logits.float(), language_labels, ignore_index=IGNORE_INDEX)
