"""How many new experts each layer gets, and which layers get the old/new classifiers.

Every signal method turns a per-layer signal into a per-layer *need* (more need, more experts):
- "layermoe" (LayerMoE): need = 1/S_i, S_i the layer's cross-lingual similarity;
- "neuron" (NeuronMoE): need = the layer's count of language-specific neurons;
- "param_delta" (DMoE): need = the relative change of the layer's MLP after a brief fine-tune;
- "late_layers" (Apollo's post-MoE): need 1 (or 1/S_i) from `start_layer` on, 0 before.
"uniform" (MoE-LPR) and "fixed" take no signal. The need is then mapped to counts:
- "proportional": N_i = ceil((need_i / sum_j need_j) * delta) (LayerMoE's formula), or with
  rounding "exact" the largest-remainder rounding of the same shares, whose total is delta.
  Shares above `max_per_layer` are given to the other layers, so the total reaches delta
  whenever the bounds allow; when they do not, `Allocation.note` says so.
- "minmax" (NeuronMoE): N_i = min + floor(norm_i * (max - min)), norm_i the need min-max
  normalised over the layers; delta is not used.
- "threshold" (DMoE): the layers whose min-max normalised need is >= `threshold` share delta
  equally; the others stay dense.
Counts are of NEW experts; the default min_per_layer=1 reproduces the reference's "at least 2
experts per layer" (the frozen original plus one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import LayerMoEError

AllocationMethod = Literal["layermoe", "uniform", "fixed", "neuron", "param_delta", "late_layers"]
AllocationMapping = Literal["proportional", "minmax", "threshold"]
Rounding = Literal["ceil", "exact"]
# Each signal method's mapping in its paper; `mapping` overrides it (e.g. "proportional" for an equal budget).
PAPER_MAPPING: dict[str, AllocationMapping] = {
    "layermoe": "proportional",
    "neuron": "minmax",
    "param_delta": "threshold",
    "late_layers": "proportional",
}
# Shares are ceiled; a share that is an integer up to float rounding (e.g. 1.0000000000000002)
# must stay that integer, or every layer of a flat profile would overshoot by one.
_ROUNDING_DIGITS = 9


class AllocationSettings(BaseModel):
    """How many new experts a round adds and to which layers: the allocation method, its budget (delta) and per-layer
    bounds, and the settings of the signal the method reads."""

    model_config = ConfigDict(extra="forbid", title="Expert budget")

    method: AllocationMethod = Field(
        "layermoe",
        title="Method",
        description="layermoe: by hidden-state similarity to the old languages (the paper); uniform: the same count in every "
        "layer (MoE-LPR); fixed: the counts in `fixed`; neuron, param_delta, late_layers: the other signals compared in "
        "`layermoe compare`",
    )
    delta: int = Field(
        8, title="Budget (delta)", description="total budget of new experts over all layers (proportional and threshold mappings)"
    )
    rounding: Rounding = Field(
        "ceil",
        title="Rounding",
        description="proportional: 'ceil' (the paper; the total may exceed delta) or 'exact' (largest remainder, total = delta)",
    )
    mapping: AllocationMapping | None = Field(
        None, title="Mapping", description="signal -> counts; empty: the method's paper mapping (see PAPER_MAPPING)"
    )
    per_layer: int = Field(1, title="Experts per layer (uniform)", description="uniform: new experts in every layer (the MoE-LPR baseline)")
    fixed: list[int] | None = Field(
        None, title="Fixed counts", description="with method fixed: new experts per layer, one count per layer; empty: the method decides"
    )
    min_per_layer: int = Field(
        1, title="Min per layer", description="at least this many new experts per layer that may get experts (0 lets a layer stay dense)"
    )
    max_per_layer: int | None = Field(
        None, title="Max per layer", description="at most this many new experts per layer (minmax: the top of the range); empty: no cap"
    )
    clamp_similarity: float | None = Field(
        None,
        title="Similarity floor",
        description="layermoe: raise similarities below this positive floor to it, so 1/S stays defined; empty: no floor",
    )
    threshold: float = Field(
        0.6, ge=0, le=1, title="Threshold", description="threshold mapping: min-max normalised need that makes a layer MoE (DMoE: 0.6)"
    )
    start_layer: int | None = Field(
        None, ge=0, title="Start layer", description="late_layers: first layer with experts; empty: the second half"
    )
    late_layers_by: Literal["uniform", "similarity"] = Field(
        "uniform", title="Late layers by", description="late_layers: spread delta evenly or by 1/S"
    )
    neurons_per_language: int = Field(
        1000, ge=1, title="Neurons per language", description="neuron: top neurons by average precision per language (NeuronMoE: 1000)"
    )
    finetune_steps: int = Field(
        10, ge=1, title="Probe fine-tune steps", description="param_delta: MLP fine-tuning steps per new language (DMoE: 10)"
    )
    finetune_learning_rate: float = Field(
        1e-4, gt=0, title="Probe learning rate", description="param_delta: AdamW learning rate of the probe fine-tune"
    )
    finetune_batch_size: int = Field(4, ge=1, title="Probe batch size", description="param_delta: sequences per probe step")

    @property
    def effective_mapping(self) -> AllocationMapping | None:
        """The mapping in force: the plan's, or the method's paper one (None for uniform/fixed)."""
        return self.mapping or PAPER_MAPPING.get(self.method)

    @model_validator(mode="after")
    def _check(self) -> AllocationSettings:
        mapping = self.effective_mapping
        if self.mapping is not None and self.method in ("uniform", "fixed"):
            raise LayerMoEError(f"method '{self.method}' reads no signal, so `mapping` does not apply; remove it")
        if self.delta < 0:
            raise LayerMoEError(f"delta={self.delta}: the budget of new experts must be >= 0")
        if mapping in ("proportional", "threshold") and self.delta == 0:
            raise LayerMoEError(
                f"method '{self.method}' with delta=0 adds no experts (every layer would get only min_per_layer); "
                "set delta to the number of new experts to add, e.g. delta: 8"
            )
        if self.per_layer < 0:
            raise LayerMoEError(f"per_layer={self.per_layer}: the experts per layer must be >= 0")
        if self.method == "uniform" and self.per_layer == 0:
            raise LayerMoEError("method 'uniform' with per_layer=0 adds no experts, so Stage 1 has nothing to train; set per_layer >= 1")
        if self.min_per_layer < 0:
            raise LayerMoEError(f"min_per_layer={self.min_per_layer} must be >= 0")
        if self.max_per_layer is not None and self.max_per_layer < self.min_per_layer:
            raise LayerMoEError(
                f"min_per_layer={self.min_per_layer} exceeds max_per_layer={self.max_per_layer}; lower the minimum or raise the maximum"
            )
        if mapping == "minmax" and self.max_per_layer is None:
            raise LayerMoEError(
                "the minmax mapping maps the signal onto [min_per_layer, max_per_layer]; set max_per_layer "
                "(NeuronMoE used 1-6 experts in total per layer: min_per_layer: 0, max_per_layer: 5)"
            )
        if self.clamp_similarity is not None and not self.clamp_similarity > 0:
            raise LayerMoEError(f"clamp_similarity={self.clamp_similarity} must be a small positive number, e.g. 1e-3")
        if self.method == "fixed" and self.fixed is None:
            raise LayerMoEError("method='fixed' needs `fixed`, the list of new experts per layer")
        if self.fixed is not None and any(n < 0 for n in self.fixed):
            raise LayerMoEError(f"fixed={self.fixed} has negative counts; every count must be >= 0")
        if self.method == "fixed" and not any(self.fixed or []):
            raise LayerMoEError(f"fixed={self.fixed} adds no experts, so Stage 1 has nothing to train; give a layer at least 1")
        return self


class Allocation(BaseModel):
    """New experts per layer, the total the method aimed at, and why the realised total differs (if it must)."""

    counts: list[int]
    requested: int | None = Field(None, description="delta, for the mappings that spend a budget")
    note: str = Field("", description="set when the bounds (or the signal) kept the total from delta")

    @property
    def total(self) -> int:
        return sum(self.counts)


def _finite(scores: Sequence[float], what: str = "similarity scores") -> list[float]:
    scores = [float(s) for s in scores]
    if not scores:
        raise LayerMoEError(f"no {what}: give one per layer")
    not_finite = [(i, s) for i, s in enumerate(scores) if not math.isfinite(s)]
    if not_finite:
        raise LayerMoEError(f"{what} at (layer, value) {not_finite} are not finite; recompute them")
    return scores


def _positive(scores: Sequence[float], clamp: float | None) -> list[float]:
    scores = _finite(scores)
    if clamp is not None:
        return [max(s, clamp) for s in scores]
    non_positive = [(i, s) for i, s in enumerate(scores) if s <= 0]
    if non_positive:
        raise LayerMoEError(
            f"similarity scores at (layer, score) {non_positive} are not positive, so their inverse 1/S is undefined; "
            "set clamp_similarity (e.g. 1e-3) to floor them, or use method='uniform'/'fixed'"
        )
    return scores


def _min_max(values: Sequence[float]) -> list[float]:
    """Onto [0, 1] over the layers; a flat profile is all 0 (no layer stands out)."""
    low, high = min(values), max(values)
    return [(v - low) / (high - low) if high > low else 0.0 for v in values]


def _water_fill(need: Sequence[float], total: int, lower: Sequence[float], upper: Sequence[float]) -> list[float]:
    """Real shares x_i = clip(c * need_i, lower_i, upper_i) with sum x = total; needs sum(lower) <= total <= sum(upper).

    The clipped excess of a layer goes to the others in proportion to their need. A layer may
    get more than lower only if its need is positive; if no such layer can grow, the need is flat.
    """
    can_grow = [i for i in range(len(need)) if upper[i] > lower[i]]
    if not any(need[i] > 0 for i in can_grow):
        need = [1.0 if i in can_grow else 0.0 for i in range(len(need))]

    def filled(c: float) -> list[float]:
        return [min(max(c * n, lo), up) for n, lo, up in zip(need, lower, upper)]

    low, high = 0.0, 1.0
    while sum(filled(high)) < total:
        high *= 2
    for _ in range(200):  # bisection on c: sum(filled(c)) is continuous and non-decreasing
        mid = (low + high) / 2
        low, high = (mid, high) if sum(filled(mid)) < total else (low, mid)
    return filled(high)


def _largest_remainder(shares: Sequence[float], total: int, need: Sequence[float]) -> list[int]:
    """Integers summing to `total` (= round(sum of shares)): floors, then +1 by largest remainder (ties: larger need, lower layer)."""
    shares = [round(s, _ROUNDING_DIGITS) for s in shares]
    counts = [math.floor(s) for s in shares]
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), -need[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _spend(need: list[float], settings: AllocationSettings, eligible: list[bool]) -> Allocation:
    """Spend delta over the eligible layers by need, within the bounds, with the plan's rounding."""
    delta, num_layers = settings.delta, len(need)
    upper = [(settings.max_per_layer if settings.max_per_layer is not None else math.inf) if ok else 0 for ok in eligible]
    minimum = [settings.min_per_layer if ok else 0 for ok in eligible]
    lower: list[float]
    if settings.rounding == "exact":
        lower = list(minimum)
        if sum(lower) > delta:
            return Allocation(
                counts=list(minimum),
                requested=delta,
                note=(
                    f"min_per_layer={settings.min_per_layer} over {sum(eligible)} layers needs {sum(lower)} experts, "
                    f"more than delta={delta}"
                ),
            )
    else:  # ceil, as the paper: the minimum raises small shares after rounding, on top of delta
        lower = [0.0] * num_layers
    if sum(upper) < delta:
        counts = [int(max(u, lo)) for u, lo in zip(upper, minimum)]
        return Allocation(
            counts=counts,
            requested=delta,
            note=(
                f"max_per_layer={settings.max_per_layer} over {sum(eligible)} layers holds only {sum(upper)} "
                f"of delta={delta} experts; raise max_per_layer or lower delta"
            ),
        )
    shares = _water_fill(need, delta, lower, upper)
    if settings.rounding == "exact":
        counts = _largest_remainder(shares, delta, need)
    else:
        counts = [max(math.ceil(round(s, _ROUNDING_DIGITS)), lo) for s, lo in zip(shares, minimum)]
    return Allocation(counts=[int(n) for n in counts], requested=delta)


def _need(signal: Sequence[float], settings: AllocationSettings) -> tuple[list[float], list[bool]]:
    """Per layer: the need the mapping distributes, and whether the layer may get experts at all."""
    if settings.method == "layermoe":
        need = [1 / s for s in _positive(signal, settings.clamp_similarity)]
        return need, [True] * len(need)
    if settings.method == "late_layers":
        num_layers = len(_finite(signal))
        start = settings.start_layer if settings.start_layer is not None else num_layers // 2
        if start >= num_layers:
            raise LayerMoEError(f"start_layer={start} but the model has {num_layers} layers; use 0 <= start_layer < {num_layers}")
        eligible = [i >= start for i in range(num_layers)]
        if settings.late_layers_by == "similarity":
            need = [1 / s if ok else 0.0 for s, ok in zip(_positive(signal, settings.clamp_similarity), eligible)]
        else:
            need = [1.0 if ok else 0.0 for ok in eligible]
        return need, eligible
    need = _finite(signal, f"{settings.method} signal values")
    negative = [(i, v) for i, v in enumerate(need) if v < 0]
    if negative:
        raise LayerMoEError(f"{settings.method} signal at (layer, value) {negative} is negative; a need must be >= 0")
    return need, [True] * len(need)


def allocate_experts(signal: Sequence[float], settings: AllocationSettings) -> Allocation:
    """New experts per layer from the method's per-layer signal (one value per decoder layer).

    The signal is the similarity score for "layermoe" and "late_layers" (and is only counted for
    "uniform" and "fixed"), the neuron count for "neuron", the MLP change for "param_delta".
    """
    num_layers = len(signal)
    if settings.method == "uniform":
        return Allocation(counts=[settings.per_layer] * num_layers)
    if settings.method == "fixed":
        fixed = settings.fixed
        assert fixed is not None  # AllocationSettings requires it for "fixed"
        if len(fixed) != num_layers:
            raise LayerMoEError(f"fixed has {len(fixed)} counts but the model has {num_layers} layers; give one count per layer")
        return Allocation(counts=list(fixed))
    need, eligible = _need(signal, settings)
    mapping = settings.effective_mapping
    if mapping == "proportional":
        return _spend(need, settings, eligible)
    normalised = _min_max(need)
    if mapping == "minmax":
        low, high = settings.min_per_layer, settings.max_per_layer
        assert high is not None  # AllocationSettings requires it for "minmax"
        # the reference's int(): floor, so only the layer of the largest need reaches the maximum
        counts = [low + math.floor(round(x * (high - low), _ROUNDING_DIGITS)) for x in normalised]
        return Allocation(counts=counts)
    # threshold: a flat signal singles out no layer, so every layer qualifies
    chosen = [x >= settings.threshold for x in normalised] if max(need) > min(need) else [True] * num_layers
    return _spend([1.0 if ok else 0.0 for ok in chosen], settings, chosen)


def choose_classifier_layers(scores: Sequence[float], k: int, allocation: Sequence[int] | None = None) -> list[int]:
    """The k layers of highest similarity (ties: the lower layer), in ascending layer order.

    With `allocation`, only layers that get new experts qualify (a dense layer has no new path
    to classify for), so fewer than k come back when fewer layers get experts.
    """
    scores = _finite(scores)
    if not 0 <= k <= len(scores):
        raise LayerMoEError(f"k={k} classifier layers requested but the model has {len(scores)} layers; use 0 <= k <= {len(scores)}")
    candidates = [i for i in range(len(scores)) if allocation is None or allocation[i] > 0]
    return sorted(sorted(candidates, key=lambda i: (-scores[i], i))[:k])
