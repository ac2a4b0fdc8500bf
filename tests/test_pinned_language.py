"""Language-pinned serving (docs/pinned-serving.md): pinned to a language, the newest child computes exactly
the version that learned it, through save, reload and registry download, on Llama and Qwen2, fp32 and bf16.

The lineage is the registry's three-round one (base en; el, hu, tr): layer 1 dense in round 1, a classifier
in layer 0 every round, layer 2 without a round-3 router. Its trained tensors are perturbed, so the plain
child's old languages drift and the pinned checks below are not empty.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from layermoe_core import LayerMoEError, expand, forced_old_routing, pinned_language
from layermoe_core.evaluation.gates import GateSettings, evaluate_gates
from layermoe_core.evaluation.generation import greedy_generate
from layermoe_core.evaluation.metrics import EvalSettings, compare_models, evaluate_model, pinned_drifts
from registry import download_version
from registry.model_card import child_card, drift_record

from .conftest import tiny_model
from .test_registry_delta import ROUNDS, build_chain

# The version (1-based, as registered) that learned each language of the chain.
LEARNED_IN = {"en": 1, **{new[0]: number for number, (_, new, _) in enumerate(ROUNDS, start=2)}}
PROMPTS = ["Hello there", "abc", "Kalimera, ti kaneis?"]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 0.0}


@pytest.fixture(
    scope="module",
    params=[("llama", torch.float32), ("qwen2", torch.float32), ("llama", torch.bfloat16), ("qwen2", torch.bfloat16)],
    ids=["llama-fp32", "qwen2-fp32", "llama-bf16", "qwen2-bf16"],
)
def lineage(request, tmp_path_factory):
    """(dtype, each version's saved folder, the newest version downloaded from the registry)."""
    family, dtype = request.param
    root = tmp_path_factory.mktemp(f"pinned-{family}")
    settings, folders = build_chain(root, family, dtype)
    newest = download_version(settings, len(folders), root / "downloaded").path
    return dtype, folders, newest


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()


@torch.no_grad()
def logits(model, token_ids) -> torch.Tensor:
    return model(token_ids).logits.float()


@pytest.mark.parametrize("language", list(LEARNED_IN))
def test_the_pinned_child_is_the_version_that_learned_the_language(lineage, language, token_ids):
    dtype, folders, newest = lineage
    child, learned = load(newest), load(folders[LEARNED_IN[language] - 1])
    assert child.dtype == learned.dtype == dtype
    expected = logits(learned, token_ids)
    with pinned_language(child, language):
        pinned = logits(child, token_ids)
    torch.testing.assert_close(pinned, expected, atol=TOLERANCE[dtype], rtol=0)
    if language != "tr":  # an old language: the classifier-routed child drifted from it, so the pin changed something
        assert (logits(child, token_ids) - expected).abs().max() > 1e-2
    else:  # the newest language: pinned and plain are the same model
        assert torch.equal(logits(child, token_ids), pinned)


@pytest.mark.parametrize("language", list(LEARNED_IN))
def test_greedy_generate_pinned_gives_the_tokens_of_the_version_that_learned_the_language(lineage, language):
    _, folders, newest = lineage
    tokenizer = AutoTokenizer.from_pretrained(newest)
    learned = greedy_generate(load(folders[LEARNED_IN[language] - 1]), tokenizer, PROMPTS, max_new_tokens=12, batch_size=2)
    assert greedy_generate(load(newest), tokenizer, PROMPTS, max_new_tokens=12, batch_size=2, language=language) == learned


def test_plain_greedy_generate_of_an_old_language_differs_from_pinned(lineage):
    """The pin is what makes the generations above match: unpinned, the perturbed child writes other text."""
    _, folders, newest = lineage
    tokenizer, child = AutoTokenizer.from_pretrained(newest), load(newest)
    plain = greedy_generate(child, tokenizer, PROMPTS, max_new_tokens=12)
    assert plain != greedy_generate(child, tokenizer, PROMPTS, max_new_tokens=12, language="en")


def test_an_unknown_language_is_refused_with_the_models_languages(lineage):
    _, _, newest = lineage
    child = load(newest)
    refused = r"language 'fi' is not one this model was taught; its languages are \['en', 'el', 'hu', 'tr'\]"
    with pytest.raises(LayerMoEError, match=refused):
        with pinned_language(child, "fi"):
            pass
    assert all(block.routed_rounds is None for block in child.moe_blocks().values())


def test_pins_nest_and_restore_the_routing_they_found(token_ids):
    child = expand(expand(tiny_model("llama"), [1, 1, 1], ["en"], ["el"]), [1, 0, 1], ["en", "el"], ["hu"])
    with torch.no_grad():
        for name, param in child.named_parameters():
            if "new_experts" in name or "routers" in name:  # what the rounds added; the base's tensors stay as they were
                param.add_(0.3 * torch.randn_like(param))
    plain = logits(child, token_ids)
    with pinned_language(child, "hu"):
        torch.testing.assert_close(logits(child, token_ids), plain, atol=0, rtol=0)  # the newest language: no cut
        with forced_old_routing(child):
            parent = logits(child, token_ids)
            with pinned_language(child, "en"):
                base = logits(child, token_ids)
            torch.testing.assert_close(logits(child, token_ids), parent, atol=0, rtol=0)
        torch.testing.assert_close(logits(child, token_ids), plain, atol=0, rtol=0)
    with pinned_language(child, "el"):
        torch.testing.assert_close(logits(child, token_ids), parent, atol=0, rtol=0)
    torch.testing.assert_close(base, logits(tiny_model("llama"), token_ids), atol=0, rtol=0)  # a base language: the dense base
    assert (plain - parent).abs().max() > 1e-2 and (parent - base).abs().max() > 1e-2  # each cut changed something
    assert torch.equal(logits(child, token_ids), plain)


def test_a_dense_model_has_nothing_to_pin():
    with pytest.raises(LayerMoEError, match=r"pinning language 'en' needs a LayerMoE model; Qwen2ForCausalLM is a dense model"):
        with pinned_language(tiny_model("qwen2"), "en"):
            pass


# -- pinned drift, measured -----------------------------------------------------------------
def heldout(languages) -> dict[str, torch.Tensor]:
    """Held-out rows per language (ids of the tiny tokenizer's characters), a different draw per language."""
    return {language: torch.randint(3, 79, (6, 16), generator=torch.Generator().manual_seed(i)) for i, language in enumerate(languages)}


def test_evaluation_measures_pinned_drift_zero_where_plain_drift_is_not(lineage):
    dtype, folders, newest = lineage
    old, new = ["en", "el", "hu"], ["tr"]
    sequences = heldout(old + new)
    settings = EvalSettings(batch_size=4, continuation_prompts=0)
    parent = evaluate_model(load(folders[-2]), None, sequences, settings, pinned_languages=old)
    child = evaluate_model(load(newest), None, sequences, settings, pinned_languages=old)
    comparison = compare_models(parent, child, old, new)
    pinned = pinned_drifts(comparison)
    assert pinned.index.tolist() == old
    assert (pinned.abs() <= (1e-6 if dtype == torch.float32 else 0.0)).all(), pinned
    plain = comparison[(comparison["metric"] == "loss") & (comparison["group"] == "old")].set_index("language")["delta"]
    assert (plain.abs() > 1e-3).all(), plain  # the classifier-routed child drifted on every old language
    values = comparison.set_index(["language", "metric"])["parent"]
    assert values["en", "pinned_loss"] != values["en", "loss"]  # the parent pinned to en is the base, not the parent itself

    decision = evaluate_gates(comparison, GateSettings(max_old_loss_increase=10.0, require_new_improvement=False))
    for language in old:
        (reason,) = [r for r in decision.reasons if r.startswith(f"old language {language}:")]
        assert f"; pinned to {language}: " in reason and reason.endswith("(+0.0000 nats)"), reason
    card = child_card("layermoe", 3, 3, 2, old, new, [1, 2, 0], [0], comparison, None, None)
    assert "| pinned drift |" in card
    loss = comparison[(comparison["metric"] == "loss")].set_index("language")
    en = loss.loc["en"]
    assert f"| en | old | {en.parent:.4f} | {en.child:.4f} | {plain['en']:+.4f} | {pinned['en']:+.4f} |" in card
    assert drift_record(comparison)["layermoe.pinned_drift_max"] == pinned.max()


def test_a_pinned_drift_above_the_bound_fails_the_gate_and_names_the_language():
    rows = [
        ("en", "old", "loss", 2.0, 2.01),
        ("en", "old", "pinned_loss", 2.0, 2.3),
        ("el", "new", "loss", 4.0, 3.0),
    ]
    comparison = pd.DataFrame(
        [{"language": lang, "group": g, "metric": m, "parent": p, "child": c, "delta": c - p} for lang, g, m, p, c in rows]
    )
    decision = evaluate_gates(comparison, GateSettings(max_old_loss_increase=0.05))
    assert not decision.passed
    assert decision.reasons == [
        "old language en: pinned loss rose +0.3000 nats, beyond 0.0500; pinned to its language the child must compute "
        "the version that learned it"
    ]


def test_a_dense_parent_is_its_own_pinned_model(token_ids):
    sequences = heldout(["en"])
    dense = tiny_model("qwen2")
    table = evaluate_model(dense, None, sequences, EvalSettings(batch_size=4), pinned_languages=["en"]).set_index("metric")["value"]
    assert table["pinned_loss"] == table["loss"]
