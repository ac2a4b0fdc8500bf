"""Expert allocation and classifier-layer choice (shared/design.md, 'Allocation', 'Classifiers')."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from layermoe_core.allocation import AllocationSettings, allocate_experts, choose_classifier_layers
from layermoe_core.errors import LayerMoEError

SCORES = [0.5, 0.25, 1.0, 0.8]


def test_layermoe_allocation_matches_the_formula_worked_by_hand():
    # 1/S = [2, 4, 1, 1.25], sum 8.25; shares * 10 = [2.42, 4.85, 1.21, 1.52] -> ceil [3, 5, 2, 2]
    allocation = allocate_experts(SCORES, AllocationSettings(delta=10))
    assert allocation == [3, 5, 2, 2]
    assert sum(allocation) >= 10


def test_least_similar_layer_gets_the_most_experts():
    allocation = allocate_experts(SCORES, AllocationSettings(delta=10))
    assert allocation.index(max(allocation)) == SCORES.index(min(SCORES))


def test_flat_profile_does_not_overshoot_from_float_rounding():
    # (1/0.3) / 10 * 3 is 1.0000000000000002 in floats; a plain ceil would give 2 per layer
    assert allocate_experts([0.3, 0.3, 0.3], AllocationSettings(delta=3)) == [1, 1, 1]


def test_min_and_max_per_layer_clip_the_counts():
    assert allocate_experts(SCORES, AllocationSettings(delta=10, min_per_layer=3)) == [3, 5, 3, 3]
    assert allocate_experts(SCORES, AllocationSettings(delta=10, max_per_layer=4)) == [3, 4, 2, 2]


def test_ceil_gives_every_layer_an_expert_even_with_min_per_layer_zero():
    # shares * 2 = [1.96, 0.02, 0.02]: any positive share ceils to 1, so only delta=0 leaves layers dense
    assert allocate_experts([0.01, 1.0, 1.0], AllocationSettings(delta=2, min_per_layer=0)) == [2, 1, 1]
    assert allocate_experts([0.01, 1.0, 1.0], AllocationSettings(delta=0, min_per_layer=0)) == [0, 0, 0]


def test_uniform_gives_per_layer_everywhere():
    assert allocate_experts(SCORES, AllocationSettings(method="uniform", per_layer=5)) == [5, 5, 5, 5]


def test_fixed_returns_the_users_vector():
    assert allocate_experts(SCORES, AllocationSettings(method="fixed", fixed=[0, 2, 1, 3])) == [0, 2, 1, 3]


def test_fixed_vector_of_wrong_length_is_rejected():
    with pytest.raises(LayerMoEError, match="fixed has 3 counts but the model has 4 layers"):
        allocate_experts(SCORES, AllocationSettings(method="fixed", fixed=[1, 1, 1]))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(delta=-1), "delta=-1"),
        (dict(min_per_layer=3, max_per_layer=2), "min_per_layer=3 exceeds max_per_layer=2"),
        (dict(method="fixed"), "needs `fixed`"),
        (dict(method="fixed", fixed=[1, -1]), "negative"),
        (dict(clamp_similarity=0.0), "clamp_similarity=0.0"),
        (dict(methd="uniform"), "methd"),
    ],
)
def test_bad_settings_are_rejected_with_the_bad_value(settings, message):
    with pytest.raises(ValidationError, match=message):
        AllocationSettings(**settings)


def test_non_positive_similarity_is_rejected_unless_clamped():
    with pytest.raises(LayerMoEError, match=r"\(1, -0\.1\).*inverse 1/S is undefined.*clamp_similarity"):
        allocate_experts([0.5, -0.1, 0.5], AllocationSettings(delta=4))
    # clamped to 0.1: 1/S = [2, 10, 2], shares * 4 = [0.57, 2.86, 0.57] -> [1, 3, 1]
    assert allocate_experts([0.5, -0.1, 0.5], AllocationSettings(delta=4, clamp_similarity=0.1)) == [1, 3, 1]


def test_nan_similarity_is_rejected():
    with pytest.raises(LayerMoEError, match="not finite"):
        allocate_experts([0.5, float("nan")], AllocationSettings(delta=4))


def test_max_per_layer_too_small_for_the_budget_is_rejected():
    with pytest.raises(LayerMoEError, match="cannot hold delta=10"):
        allocate_experts(SCORES, AllocationSettings(delta=10, max_per_layer=2))


def test_classifier_layers_are_the_top_k_by_similarity_in_layer_order():
    assert choose_classifier_layers([0.2, 0.9, 0.1, 0.7, 0.8], 3) == [1, 3, 4]
    assert choose_classifier_layers([0.5, 0.5, 0.1], 1) == [0]  # ties go to the lower layer
    assert choose_classifier_layers(SCORES, 0) == []


@pytest.mark.parametrize("k", [-1, 5])
def test_classifier_count_outside_the_layers_is_rejected(k):
    with pytest.raises(LayerMoEError, match=f"k={k}"):
        choose_classifier_layers(SCORES, k)
