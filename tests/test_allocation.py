"""Expert allocation and classifier-layer choice (docs/design.md, 'Allocation', 'Classifiers')."""

from __future__ import annotations

import random

import pytest
import yaml
from pydantic import ValidationError

from flows.plan import ExpansionPlan, load_plan
from layermoe_core.analysis.allocation import AllocationSettings, allocate_experts, choose_classifier_layers
from layermoe_core.errors import LayerMoEError
from tests.tiny_tokenizer import tiny_tokenizer

SCORES = [0.5, 0.25, 1.0, 0.8]


def counts(scores, **settings) -> list[int]:
    return allocate_experts(scores, AllocationSettings(**settings)).counts


def test_layermoe_allocation_matches_the_formula_worked_by_hand():
    # 1/S = [2, 4, 1, 1.25], sum 8.25; shares * 10 = [2.42, 4.85, 1.21, 1.52] -> ceil [3, 5, 2, 2]
    allocation = counts(SCORES, delta=10)
    assert allocation == [3, 5, 2, 2]
    assert sum(allocation) >= 10


def test_least_similar_layer_gets_the_most_experts():
    allocation = counts(SCORES, delta=10)
    assert allocation.index(max(allocation)) == SCORES.index(min(SCORES))


def test_flat_profile_does_not_overshoot_from_float_rounding():
    # (1/0.3) / 10 * 3 is 1.0000000000000002 in floats; a plain ceil would give 2 per layer
    assert counts([0.3, 0.3, 0.3], delta=3) == [1, 1, 1]


def test_min_and_max_per_layer_bound_the_counts():
    assert counts(SCORES, delta=10, min_per_layer=3) == [3, 5, 3, 3]  # ceil mode: the minimum raises, as in the paper
    # layer 1's share 4.85 is cut to 4; its excess goes to the others by need: 6 * [2, 1, 1.25] / 4.25 -> ceil [3, 2, 2]
    assert counts(SCORES, delta=10, max_per_layer=4) == [3, 4, 2, 2]


def test_ceil_gives_every_layer_an_expert_even_with_min_per_layer_zero():
    # shares * 2 = [1.96, 0.02, 0.02]: any positive share ceils to 1
    assert counts([0.01, 1.0, 1.0], delta=2, min_per_layer=0) == [2, 1, 1]


def test_uniform_gives_per_layer_everywhere():
    assert counts(SCORES, method="uniform", per_layer=5) == [5, 5, 5, 5]


def test_fixed_returns_the_users_vector():
    assert counts(SCORES, method="fixed", fixed=[0, 2, 1, 3]) == [0, 2, 1, 3]


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
        (dict(method="layermoe", delta=0), "delta=0 adds no experts.*set delta"),
        (dict(method="late_layers", delta=0), "delta=0 adds no experts"),
        (dict(method="uniform", per_layer=0), "per_layer=0 adds no experts.*per_layer >= 1"),
        (dict(method="fixed", fixed=[0, 0]), "adds no experts"),
        (dict(method="neuron", min_per_layer=0), "set max_per_layer"),
        (dict(method="uniform", mapping="minmax"), "does not apply"),
        (dict(rounding="floor"), "rounding"),
    ],
)
def test_bad_settings_are_rejected_with_the_bad_value(settings, message):
    with pytest.raises(ValidationError, match=message):
        AllocationSettings(**settings)


def test_non_positive_similarity_is_rejected_unless_clamped():
    with pytest.raises(LayerMoEError, match=r"\(1, -0\.1\).*inverse 1/S is undefined.*clamp_similarity"):
        allocate_experts([0.5, -0.1, 0.5], AllocationSettings(delta=4))
    # clamped to 0.1: 1/S = [2, 10, 2], shares * 4 = [0.57, 2.86, 0.57] -> [1, 3, 1]
    assert counts([0.5, -0.1, 0.5], delta=4, clamp_similarity=0.1) == [1, 3, 1]


def test_nan_similarity_is_rejected():
    with pytest.raises(LayerMoEError, match="not finite"):
        allocate_experts([0.5, float("nan")], AllocationSettings(delta=4))


def test_max_per_layer_too_small_for_the_budget_is_recorded_not_hidden():
    allocation = allocate_experts(SCORES, AllocationSettings(delta=10, max_per_layer=2))
    assert allocation.counts == [2, 2, 2, 2] and allocation.requested == 10
    assert "holds only 8 of delta=10" in allocation.note and "raise max_per_layer" in allocation.note


def test_classifier_layers_are_the_top_k_by_similarity_in_layer_order():
    assert choose_classifier_layers([0.2, 0.9, 0.1, 0.7, 0.8], 3) == [1, 3, 4]
    assert choose_classifier_layers([0.5, 0.5, 0.1], 1) == [0]  # ties go to the lower layer
    assert choose_classifier_layers(SCORES, 0) == []


def test_classifier_layers_are_chosen_among_the_layers_that_get_experts():
    # layers 1 and 3 are the most similar but stay dense: the next most similar layers with experts get the classifiers
    assert choose_classifier_layers([0.2, 0.9, 0.1, 0.7, 0.8], 2, allocation=[1, 0, 2, 0, 1]) == [0, 4]
    assert choose_classifier_layers([0.2, 0.9, 0.1], 3, allocation=[0, 0, 2]) == [2]


@pytest.mark.parametrize("k", [-1, 5])
def test_classifier_count_outside_the_layers_is_rejected(k):
    with pytest.raises(LayerMoEError, match=f"k={k}"):
        choose_classifier_layers(SCORES, k)


def test_delta_zero_and_per_layer_zero_are_refused_when_the_plan_loads(tmp_path):
    for allocation, message in [
        ({"method": "layermoe", "delta": 0}, "allocation: .*delta=0"),
        ({"method": "uniform", "per_layer": 0}, "allocation: .*per_layer=0"),
    ]:
        plan = tmp_path / "plan.yaml"
        plan.write_text(yaml.safe_dump({"new_languages": ["el"], "corpora": {"el": {"path": str(tmp_path)}}, "allocation": allocation}))
        with pytest.raises(LayerMoEError, match=message):
            load_plan(plan, ExpansionPlan)


def test_max_per_layer_gives_the_clipped_experts_to_other_layers_until_delta():
    # The case: delta=48 and max 3 over 24 layers fell short when clipping dropped experts. Here 8 dissimilar
    # layers ask for 48 * 20/176 = 5.45 each; clipping alone gave 8 * 3 + 16 * ceil(0.27) = 40. Redistributed, the
    # 16 similar layers share the other 24: 1.5 each.
    scores = [0.05] * 8 + [1.0] * 16
    ceil = allocate_experts(scores, AllocationSettings(delta=48, max_per_layer=3))
    exact = allocate_experts(scores, AllocationSettings(delta=48, max_per_layer=3, rounding="exact"))
    assert ceil.counts == [3] * 8 + [2] * 16 and ceil.total == 56
    assert exact.counts == [3] * 8 + [2] * 8 + [1] * 8 and exact.total == 48
    assert ceil.note == exact.note == ""


def test_exact_rounding_is_largest_remainder_and_totals_delta():
    # shares * 10 = [2.42, 4.85, 1.21, 1.52]: floors [2, 4, 1, 1] = 8; the 2 left go to .85 (layer 1) and .52 (layer 3)
    assert counts(SCORES, delta=10, rounding="exact") == [2, 5, 1, 2]
    # a flat profile's equal remainders: ties go to the lower layers
    assert counts([0.5, 0.5, 0.5], delta=4, rounding="exact", min_per_layer=0) == [2, 1, 1]


def test_exact_rounding_records_a_minimum_the_budget_cannot_pay():
    allocation = allocate_experts(SCORES, AllocationSettings(delta=10, min_per_layer=3, rounding="exact"))
    assert allocation.counts == [3, 3, 3, 3] and "needs 12 experts, more than delta=10" in allocation.note


def test_neuron_minmax_maps_the_counts_onto_the_bounds_like_the_reference():
    # counts [10, 2, 7, 0] -> min-max [1, .2, .7, 0] -> 0 + floor(x * 5) = [5, 1, 3, 0]; layer 3 stays dense
    allocation = allocate_experts([10, 2, 7, 0], AllocationSettings(method="neuron", min_per_layer=0, max_per_layer=5))
    assert allocation.counts == [5, 1, 3, 0] and allocation.requested is None
    # flat counts single out no layer: every layer gets the minimum
    assert counts([4, 4, 4], method="neuron", min_per_layer=1, max_per_layer=5) == [1, 1, 1]


def test_param_delta_threshold_shares_delta_among_the_layers_that_changed_most():
    # min-max of [.1, .5, .2, .9] = [0, .5, .125, 1]: only layer 3 reaches 0.6; at 0.4 layers 1 and 3 share 6
    assert counts([0.1, 0.5, 0.2, 0.9], method="param_delta", delta=6) == [0, 0, 0, 6]
    assert counts([0.1, 0.5, 0.2, 0.9], method="param_delta", delta=6, threshold=0.4) == [0, 3, 0, 3]
    # "in proportion" is the proportional mapping of the same signal
    assert counts([0.1, 0.5, 0.2, 0.9], method="param_delta", delta=17, mapping="proportional", rounding="exact") == [1, 5, 2, 9]


def test_late_layers_put_experts_only_from_start_layer_on():
    assert counts(SCORES, method="late_layers", delta=6) == [0, 0, 3, 3]  # default start: the second half
    # by similarity from layer 1: 1/S = [4, 1, 1.25] -> 5 * [.64, .16, .2] = [3.2, .8, 1] -> ceil [4, 1, 1]
    assert counts(SCORES, method="late_layers", delta=5, start_layer=1, late_layers_by="similarity") == [0, 4, 1, 1]
    with pytest.raises(LayerMoEError, match="start_layer=4 but the model has 4 layers"):
        allocate_experts(SCORES, AllocationSettings(method="late_layers", start_layer=4))


SIGNAL_METHODS = [
    dict(method="layermoe"),
    dict(method="neuron", mapping="proportional"),
    dict(method="param_delta"),
    dict(method="param_delta", mapping="proportional"),
    dict(method="late_layers"),
    dict(method="late_layers", late_layers_by="similarity"),
]


@pytest.mark.parametrize("method", SIGNAL_METHODS, ids=lambda m: "-".join(map(str, m.values())))
@pytest.mark.parametrize("rounding", ["ceil", "exact"])
def test_budgeted_methods_respect_the_bounds_and_state_their_totals(method, rounding):
    rng = random.Random(f"{method}{rounding}")
    for _ in range(200):
        num_layers = rng.randint(1, 12)
        signal = [rng.uniform(0.01, 1.0) for _ in range(num_layers)]
        low = rng.randint(0, 2)
        high = rng.choice([None, low + rng.randint(0, 4)])
        settings = AllocationSettings(**method, rounding=rounding, delta=rng.randint(1, 40), min_per_layer=low, max_per_layer=high)
        allocation = allocate_experts(signal, settings)
        cap = high if high is not None else float("inf")
        eligible = [n for n in allocation.counts if n > 0]
        assert len(allocation.counts) == num_layers and all(0 <= n <= cap for n in allocation.counts)
        assert all(n >= low for n in eligible) and allocation.requested == settings.delta
        if allocation.note:  # only when the bounds cannot meet delta, and then at the bound
            assert allocation.total != settings.delta or "needs" in allocation.note
        elif rounding == "exact":
            assert allocation.total == settings.delta
        else:
            assert settings.delta <= allocation.total <= settings.delta + num_layers * max(1, low)


@pytest.mark.parametrize("low, high", [(0, 5), (1, 3), (2, 2)])
def test_minmax_counts_stay_in_the_bounds_and_the_top_layer_gets_the_maximum(low, high):
    rng = random.Random(low * 10 + high)
    for _ in range(100):
        signal = [rng.randint(0, 50) for _ in range(rng.randint(2, 10))]
        allocation = allocate_experts(signal, AllocationSettings(method="neuron", min_per_layer=low, max_per_layer=high))
        assert all(low <= n <= high for n in allocation.counts)
        if max(signal) > min(signal):
            assert allocation.counts[signal.index(max(signal))] == high
            assert allocation.counts[signal.index(min(signal))] == low


def test_uniform_and_fixed_totals_are_the_stated_counts():
    rng = random.Random(7)
    for _ in range(50):
        num_layers, per_layer = rng.randint(1, 30), rng.randint(1, 8)
        uniform = allocate_experts([0.5] * num_layers, AllocationSettings(method="uniform", per_layer=per_layer))
        assert uniform.total == per_layer * num_layers and uniform.requested is None and uniform.note == ""
        vector = [rng.randint(0, 4) for _ in range(num_layers - 1)] + [1]
        assert allocate_experts([0.5] * num_layers, AllocationSettings(method="fixed", fixed=vector)).counts == vector


def test_fertility_counts_tokens_per_character_and_word_and_warns_about_a_costly_new_script():
    from layermoe_core.analysis.fertility import costly_languages, fertility_table

    tokenizer = tiny_tokenizer()
    texts = {"en": ["the cat sat on the mat"], "el": ["η γάτα κάθεται"]}
    table = fertility_table(tokenizer, texts, new_languages=["el"]).set_index("language")
    for language, (text,) in texts.items():
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert table.loc[language, "tokens"] == tokens
        assert table.loc[language, "tokens_per_char"] == pytest.approx(tokens / len(text))
        assert table.loc[language, "tokens_per_word"] == pytest.approx(tokens / len(text.split()))
    assert table.loc["el", "group"] == "new" and table.loc["en", "group"] == "old"
    ratio = table.loc["el", "tokens_per_char"] / table.loc["en", "tokens_per_char"]
    warnings = costly_languages(table.reset_index())
    assert (len(warnings) == 1 and "new language el costs" in warnings[0]) == (ratio >= 2.0)
    assert costly_languages(table.reset_index(), factor=ratio * 1.01) == []
    assert len(costly_languages(table.reset_index(), factor=ratio * 0.99)) == 1
