"""Evaluation: held-out perplexity, multiple-choice scoring, parent-vs-child comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from pydantic import ValidationError
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutput

from layermoe_core import LayerMoEError, expand, insert_classifiers
from layermoe_core.data.corpus import CorpusSpec, sample_sequences
from layermoe_core.evaluation.gates import GateSettings, evaluate_gates
from layermoe_core.evaluation.generation import greedy_generate
from layermoe_core.evaluation.heldout_text import continuation_prompts
from layermoe_core.evaluation.metrics import (
    COMPARISON_COLUMNS,
    EvalSettings,
    HarnessTask,
    compare_models,
    compare_variants,
    continuation_logprobs,
    continue_prompts,
    evaluate_model,
    harness_tasks,
    language_perplexity,
    lm_eval_metrics,
    lm_eval_scores,
    load_multiple_choice,
    new_language_gain,
    old_language_drift,
    score_multiple_choice,
    summarise_seeds,
)
from layermoe_core.evaluation.translation import (
    TRANSLATION_COLUMNS,
    TranslationSettings,
    fitted_prompt,
    heldout_pairs,
    translate_pairs,
    translation_metrics,
)
from layermoe_core.plots import plot_language_comparison, plot_variant_comparison

from .conftest import TINY, tiny_model
from .tiny_tokenizer import tiny_tokenizer

WORDS = ["[UNK]", "Answer:", "red", "blue", "green", "Question:", "sky", "colour?"]
ID = {word: i for i, word in enumerate(WORDS)}


class BigramLM(nn.Module):
    """A causal LM whose next-token distribution depends only on the current token: probs[current]."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.log_probs = nn.Parameter(probs.log())  # (V, V), rows sum to 1 in probability

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return CausalLMOutput(logits=self.log_probs[input_ids])  # (B, T, V)


def word_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(vocab=ID, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def answer_model() -> BigramLM:
    """After "Answer:": log p(blue) = -1, log p(red) = -2, log p(green) = -4; after "blue": log p(blue) = -2."""
    vocab = len(WORDS)
    probs = torch.full((vocab, vocab), 1.0 / vocab, dtype=torch.float64)
    for row, chosen in (("Answer:", {"blue": -1.0, "red": -2.0, "green": -4.0}), ("blue", {"blue": -2.0})):
        rest = 1 - sum(math.exp(v) for v in chosen.values())
        probs[ID[row]] = rest / (vocab - len(chosen))
        for word, log_p in chosen.items():
            probs[ID[row], ID[word]] = math.exp(log_p)
    return BigramLM(probs)


def write_jsonl(path, records) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return str(path)


QUESTION = {"language": "en", "passage": "sky", "question": "colour?", "options": ["red", "blue"], "answer": 1}


# -- perplexity ---------------------------------------------------------------------------------
def test_perplexity_is_the_token_weighted_mean_nll_of_a_known_distribution():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    model = BigramLM(probs)
    sequences = {
        "en": torch.tensor([[0, 1, 2], [2, 2, 0], [1, 0, 1]]),  # batches of 2 and 1 sequences
        "el": torch.tensor([[2, 0, 2, 1, 0]]),  # every step predicted from token 2 or uniform row
    }
    table = language_perplexity(model, sequences, batch_size=2).set_index("language")
    # en transitions: 0->1, 1->2, 2->2, 2->0, 1->0, 0->1
    en_loss = -(2 * math.log(0.25) + math.log(0.7) + 2 * math.log(1 / 3) + math.log(0.1)) / 6
    # el transitions: 2->0, 0->2, 2->1, 1->0
    el_loss = -(math.log(1 / 3) + math.log(0.25) + math.log(1 / 3) + math.log(0.1)) / 4
    assert table.loc["en", "loss"] == pytest.approx(en_loss, rel=1e-6)
    assert table.loc["el", "loss"] == pytest.approx(el_loss, rel=1e-6)
    assert table.loc["en", "perplexity"] == pytest.approx(math.exp(en_loss), rel=1e-6)
    assert table.loc["en", "tokens"] == 6 and table.loc["el", "tokens"] == 4


def test_max_sequences_keeps_the_first_sequences_only():
    model = BigramLM(torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64))
    table = language_perplexity(model, {"en": torch.tensor([[0, 0], [1, 1]])}, batch_size=4, max_sequences=1)
    assert table.loc[0, "tokens"] == 1
    assert table.loc[0, "loss"] == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("expanded", [False, True], ids=["dense", "layermoe"])
def test_perplexity_matches_the_models_own_loss_and_restores_training_mode(expanded):
    model = tiny_model("qwen2")
    if expanded:
        model = expand(model, [1, 0, 2], ["en"], ["el"])
    ids = torch.randint(0, TINY["vocab_size"], (5, 7), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    reference = (out.lm_loss if expanded else out.loss).item()
    model.train()
    table = language_perplexity(model, {"el": ids}, batch_size=2)
    assert model.training
    assert table.loc[0, "loss"] == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize(
    "sequences, fragment",
    [
        ({"en": torch.zeros(2, 1, dtype=torch.long)}, "at least 2 tokens"),
        ({"en": torch.zeros(2, 4)}, "LongTensor"),
        ({"en": [[1, 2, 3]]}, "LongTensor"),
        ({}, "no held-out sequences"),
    ],
)
def test_bad_held_out_sequences_are_refused_with_the_fix(sequences, fragment):
    with pytest.raises(LayerMoEError, match=fragment):
        language_perplexity(BigramLM(torch.full((2, 2), 0.5)), sequences)


# -- multiple choice -----------------------------------------------------------------------------
def test_multiple_choice_picks_the_option_with_the_highest_log_likelihood(tmp_path):
    path = write_jsonl(
        tmp_path / "colours.jsonl",
        [
            {**QUESTION, "options": ["red", "blue", "green"], "answer": 1},  # blue has the highest sum and per-char score
            {**QUESTION, "options": ["green", "red"], "answer": 0},  # the model prefers red on both scores
            {**QUESTION, "language": "el", "options": ["red", "blue blue"], "answer": 1},  # -2 vs -3 in sum, -2/4 vs -3/10 per char
        ],
    )
    table = score_multiple_choice(answer_model(), word_tokenizer(), path, batch_size=2)
    scores = table.set_index(["language", "metric"])["value"]
    assert scores.to_dict() == {
        ("en", "colours.mc_acc"): 0.5,
        ("en", "colours.mc_acc_norm"): 0.5,
        ("el", "colours.mc_acc"): 0.0,
        ("el", "colours.mc_acc_norm"): 1.0,
    }
    assert table.set_index("language")["n"].to_dict() == {"en": 2, "el": 1}


def test_continuation_logprobs_sum_the_option_tokens_after_the_context():
    requests = [([ID["sky"], ID["Answer:"]], [ID["blue"], ID["blue"]]), ([ID["Answer:"]], [ID["red"]])]
    assert continuation_logprobs(answer_model(), requests, batch_size=2) == pytest.approx([-3.0, -2.0])


def test_batched_padded_scoring_equals_one_request_at_a_time():
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    requests = [
        (torch.randint(0, TINY["vocab_size"], (n_ctx,), generator=gen).tolist(), torch.randint(0, 97, (n_cont,), generator=gen).tolist())
        for n_ctx, n_cont in [(3, 1), (7, 4), (2, 2), (5, 3)]
    ]
    batched = continuation_logprobs(model, requests, batch_size=4)
    assert batched == pytest.approx(continuation_logprobs(model, requests, batch_size=1), abs=1e-4)


@pytest.mark.parametrize(
    "line, fragment",
    [
        ({k: v for k, v in QUESTION.items() if k != "question"}, "question: Field required"),
        ({**QUESTION, "answer": 2}, "answer 2 is out of range for 2 options; use a 0-based index from 0 to 1"),
        ({**QUESTION, "options": []}, "options: List should have at least 2 items"),
        ({**QUESTION, "options": ["red", ""]}, "options.1: String should have at least 1 character"),
        ({**QUESTION, "pasage": "typo"}, "pasage: Extra inputs are not permitted"),
        ('{"language": "en", "question": ', "not valid JSON"),
        ('["a", "b"]', "record: Input should be a valid dictionary"),
    ],
)
def test_bad_multiple_choice_file_names_the_file_line_and_format(tmp_path, line, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", [QUESTION, "", line])
    with pytest.raises(LayerMoEError) as error:
        load_multiple_choice(path)
    message = str(error.value)
    assert f"{path}:3:" in message and fragment in message
    assert "each line must be one JSON object" in message


def test_missing_or_empty_multiple_choice_file_is_refused(tmp_path):
    with pytest.raises(LayerMoEError, match="does not exist"):
        load_multiple_choice(tmp_path / "absent.jsonl")
    with pytest.raises(LayerMoEError, match="holds no questions"):
        load_multiple_choice(write_jsonl(tmp_path / "empty.jsonl", [""]))


def test_passage_is_optional_and_prompts_end_with_answer(tmp_path):
    (record,) = load_multiple_choice(write_jsonl(tmp_path / "q.jsonl", [{k: v for k, v in QUESTION.items() if k != "passage"}]))
    assert record.prompt() == "Question: colour?\nAnswer:"
    assert load_multiple_choice(write_jsonl(tmp_path / "p.jsonl", [QUESTION]))[0].prompt() == "sky\nQuestion: colour?\nAnswer:"


# -- lm-eval harness -------------------------------------------------------------------------------
HARNESS = Path(__file__).parent / "fixtures" / "harness"


def belebele_prompt(doc: dict) -> str:
    """lm-eval's Belebele prompt, written out here so the test checks what the harness scored."""
    options = "".join(f"\n{letter}: {doc[f'mc_answer{i}']}" for i, letter in enumerate("ABCD", start=1))
    return f"P: {doc['flores_passage']}\nQ: {doc['question'].strip()}{options}\nAnswer:"


def belebele_accuracy_by_hand(model, tokenizer, shots: int) -> float:
    """Accuracy of the best " A".." D" after the prompt; shots are the first documents other than the question's own
    (lm-eval's first_n sampler on the test split), each followed by its answer letter and a blank line."""
    docs = [json.loads(line) for line in (HARNESS / "belebele_tiny.jsonl").read_text().splitlines()]
    requests = []
    for doc in docs:
        examples = [d for d in docs[: shots + 1] if d is not doc][:shots]
        context = "".join(f"{belebele_prompt(d)} {'ABCD'[int(d['correct_answer_num']) - 1]}\n\n" for d in examples)
        requests += [(tokenizer.encode(context + belebele_prompt(doc)), tokenizer.encode(" " + letter)) for letter in "ABCD"]
    logprobs = torch.tensor(continuation_logprobs(model, requests, batch_size=4)).view(len(docs), 4)
    answers = torch.tensor([int(doc["correct_answer_num"]) - 1 for doc in docs])
    return (logprobs.argmax(-1) == answers).double().mean().item()


@pytest.mark.parametrize("expanded", [False, True], ids=["dense", "layermoe"])
def test_lm_eval_runs_a_local_belebele_task_on_the_live_model(expanded):
    """lm-eval's own evaluator, offline, on a task YAML over a local file; its accuracy is checked by hand."""
    model = tiny_model("llama", max_position_embeddings=256)
    if expanded:
        model = expand(model, [1, 0, 2], ["en"], ["el"])
        insert_classifiers(model, [0])
    table = lm_eval_scores(model, tiny_tokenizer(), {"belebele_tiny": "en"}, batch_size=4, task_files=[HARNESS / "belebele_tiny.yaml"])
    scores = table.set_index("metric")
    assert set(scores.index) == {"belebele_tiny.acc", "belebele_tiny.acc_norm"} and set(table["n"]) == {6}
    assert set(table["language"]) == {"en"}
    assert scores.loc["belebele_tiny.acc", "value"] == pytest.approx(belebele_accuracy_by_hand(model, tiny_tokenizer(), shots=0))


def test_lm_eval_runs_each_task_at_its_own_shots():
    model = tiny_model("qwen2", max_position_embeddings=512)
    table = lm_eval_scores(
        model, tiny_tokenizer(), {"belebele_tiny": HarnessTask(language="en", num_fewshot=2)}, task_files=[HARNESS / "belebele_tiny.yaml"]
    )
    acc = table.set_index("metric").loc["belebele_tiny.acc", "value"]
    assert acc == pytest.approx(belebele_accuracy_by_hand(model, tiny_tokenizer(), shots=2))


def test_reference_harness_config_names_lm_evals_own_tasks_at_the_papers_shots():
    from lm_eval.tasks import TaskManager

    settings = EvalSettings.model_validate(yaml.safe_load((Path(__file__).parents[1] / "plans" / "harness-reference.yaml").read_text()))
    tasks = harness_tasks(settings.lm_eval_tasks)
    assert set(tasks) <= set(TaskManager().all_tasks)  # every name is one lm-eval registers
    shots = {(name.split("_")[0], task.num_fewshot) for name, task in tasks.items()}
    assert shots == {("arc", 25), ("mmlu", 5), ("cmmlu", 5), ("m", 5), ("hellaswag", 10), ("belebele", 5)}
    assert {task.language for task in tasks.values()} == {"en", "es", "zh", "el", "hu", "tr", "bn", "hi", "ne"}


def test_lm_eval_results_become_metrics_without_stderr():
    results = {
        "results": {"belebele_ell_Grek": {"alias": "belebele_ell_Grek", "acc,none": 0.25, "acc_stderr,none": 0.01, "acc_norm,none": 0.5}},
        "n-samples": {"belebele_ell_Grek": {"original": 900, "effective": 40}},
    }
    table = lm_eval_metrics(results, {"belebele_ell_Grek": "el"})
    assert table.to_dict("records") == [
        {"language": "el", "metric": "belebele_ell_Grek.acc", "value": 0.25, "n": 40},
        {"language": "el", "metric": "belebele_ell_Grek.acc_norm", "value": 0.5, "n": 40},
    ]


# -- one model end to end ----------------------------------------------------------------------------
def test_evaluate_model_reports_perplexity_and_every_task_per_language(tmp_path):
    path = write_jsonl(tmp_path / "colours.jsonl", [QUESTION, {**QUESTION, "language": "el"}])
    settings = EvalSettings(batch_size=2, max_sequences=2, multiple_choice_files=[path])
    sequences = {
        lang: torch.randint(0, len(WORDS), (3, 5), generator=torch.Generator().manual_seed(i)) for i, lang in enumerate(["en", "el"])
    }
    table = evaluate_model(answer_model(), word_tokenizer(), sequences, settings)
    assert list(table.columns) == ["language", "metric", "value", "n"]
    assert set(zip(table.language, table.metric)) == {
        (lang, metric) for lang in ["en", "el"] for metric in ["loss", "perplexity", "colours.mc_acc", "colours.mc_acc_norm"]
    }
    assert set(table.loc[table.metric == "loss", "n"]) == {8}  # max_sequences=2 of 4 predicted tokens


def test_eval_settings_refuse_unknown_fields_and_clashing_task_names():
    with pytest.raises(ValidationError, match="Extra inputs"):
        EvalSettings(batchsize=4)
    with pytest.raises(ValidationError, match="distinct name"):
        EvalSettings(multiple_choice_files=["a/belebele.jsonl", "b/belebele.jsonl"])


# -- parent vs child -----------------------------------------------------------------------------------
def perplexity_table(losses: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame([{"language": lang, "loss": loss, "perplexity": math.exp(loss), "tokens": 100} for lang, loss in losses.items()])


def metrics_table(losses: dict[str, float], accuracy: dict[str, float]) -> pd.DataFrame:
    mc = pd.DataFrame([{"language": lang, "metric": "belebele.mc_acc", "value": acc, "n": 10} for lang, acc in accuracy.items()])
    long = perplexity_table(losses).melt(id_vars=["language", "tokens"], value_vars=["loss", "perplexity"], var_name="metric")
    return pd.concat([mc, long.rename(columns={"tokens": "n"})], ignore_index=True)


def test_compare_models_gives_tidy_rows_with_child_minus_parent():
    parent = metrics_table({"el": 4.0, "en": 2.0}, {"el": 0.25})
    child = metrics_table({"el": 3.0, "en": 2.1}, {"el": 0.5})
    table = compare_models(parent, child, old_languages=["en"], new_languages=["el"])
    assert tuple(table.columns) == COMPARISON_COLUMNS
    assert list(zip(table.language, table.group, table.metric)) == [
        ("en", "old", "loss"),
        ("en", "old", "perplexity"),
        ("el", "new", "loss"),
        ("el", "new", "perplexity"),
        ("el", "new", "belebele.mc_acc"),
    ]
    rows = table.set_index(["language", "metric"])
    assert rows.loc[("en", "loss"), "delta"] == pytest.approx(0.1)
    assert rows.loc[("el", "loss"), "delta"] == pytest.approx(-1.0)
    assert rows.loc[("el", "perplexity"), "delta"] == pytest.approx(math.exp(3.0) - math.exp(4.0))
    assert rows.loc[("el", "belebele.mc_acc"), ["parent", "child", "delta"]].tolist() == [0.25, 0.5, 0.25]


def test_compare_variants_puts_each_variant_side_by_side(tmp_path):
    parent = metrics_table({"el": 4.0, "en": 2.0}, {})
    layermoe = compare_models(parent, metrics_table({"el": 3.0, "en": 2.1}, {}), ["en"], ["el"])
    uniform = compare_models(parent, metrics_table({"el": 3.2, "en": 2.3}, {}), ["en"], ["el"])
    table = compare_variants(
        {
            "layermoe": {"comparison": layermoe, "allocation": [3, 1, 2], "params_added": 600},
            "uniform": {"comparison": uniform, "allocation": [5, 5, 5], "params_added": 1500},
        }
    )
    rows = table.set_index("variant")
    assert rows.loc["layermoe", "new_experts"] == 6 and rows.loc["uniform", "new_experts"] == 15
    assert rows.loc["uniform", "params_added"] == 1500
    assert rows.loc["layermoe", "old_drift"] == pytest.approx(0.1) and rows.loc["uniform", "old_drift"] == pytest.approx(0.3)
    assert rows.loc["layermoe", "new_gain"] == pytest.approx(1.0) and rows.loc["uniform", "loss_delta:el"] == pytest.approx(-0.8)
    assert plot_variant_comparison(table, tmp_path / "variants.png").stat().st_size > 0


def test_compare_models_accepts_language_perplexity_tables():
    table = compare_models(perplexity_table({"en": 2.0}), perplexity_table({"en": 2.5}), ["en"], [])
    assert table.loc[table.metric == "loss", "delta"].item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "child, old, new, fragment",
    [
        (perplexity_table({"en": 2.0, "el": 3.0}), ["en"], ["en", "el"], "both old and new"),
        (perplexity_table({"en": 2.0, "el": 3.0}), ["en"], [], "neither old"),
        (perplexity_table({"en": 2.0}), ["en"], ["el"], "only one model"),
        (perplexity_table({"en": 2.0, "el": 3.0}), ["en", "hu"], ["el"], "no held-out loss"),
    ],
)
def test_compare_models_refuses_mismatched_inputs(child, old, new, fragment):
    with pytest.raises(LayerMoEError, match=fragment):
        compare_models(perplexity_table({"en": 2.0, "el": 3.5}), child, old, new)


def test_drift_and_gain_are_mean_loss_changes_per_group():
    parent = perplexity_table({"en": 2.0, "es": 3.0, "el": 5.0, "hu": 4.0})
    child = perplexity_table({"en": 2.1, "es": 3.3, "el": 4.0, "hu": 3.0})
    table = compare_models(parent, child, ["en", "es"], ["el", "hu"])
    assert old_language_drift(table) == pytest.approx(0.2)
    assert new_language_gain(table) == pytest.approx(1.0)
    assert math.isnan(old_language_drift(compare_models(parent, child, [], ["en", "es", "el", "hu"])))


def test_language_comparison_plot_is_written_as_png(tmp_path):
    table = compare_models(perplexity_table({"en": 2.0, "el": 5.0}), perplexity_table({"en": 2.1, "el": 4.0}), ["en"], ["el"])
    for metric in ["loss", "perplexity"]:
        path = plot_language_comparison(table, tmp_path / "plots" / f"{metric}.png", metric=metric)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- generation, held-out text and translation -----------------------------------------------------------
def parallel_corpus(tmp_path, languages=("en", "el"), documents=400, with_ids=True):
    """Parallel one-line sentences: document i is "<lang> sentence number i ..." in every language."""
    specs = {}
    for lang in languages:
        path = tmp_path / f"{lang}.jsonl"
        lines = []
        for i in range(documents):
            record = {"text": f"{lang} sentence number {i} is short"}
            if with_ids:
                record["id"] = f"doc-{i}"
            lines.append(json.dumps(record))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        specs[lang] = CorpusSpec(path=path)
    return specs


@pytest.mark.parametrize("expanded", [False, True], ids=["dense", "layermoe"])
def test_batched_greedy_generation_equals_one_prompt_at_a_time(expanded):
    model = tiny_model("qwen2")
    if expanded:
        model = expand(model, [1, 0, 2], ["en"], ["el"])
        insert_classifiers(model, [0, 2])
    prompts = ["the quick brown fox", "a", "hello there, how are", "xyz"]
    batched = greedy_generate(model, tiny_tokenizer(), prompts, max_new_tokens=6, batch_size=4)
    assert batched == [greedy_generate(model, tiny_tokenizer(), [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert all(text for text in batched)


def test_greedy_generation_refuses_prompts_longer_than_the_context():
    with pytest.raises(LayerMoEError, match=r"prompts \[1\] plus 10 new tokens exceed the model's context of 64"):
        greedy_generate(tiny_model("llama"), tiny_tokenizer(), ["short", "x" * 60], max_new_tokens=10)


def test_held_out_pairs_never_come_from_training_documents(tmp_path):
    corpora = parallel_corpus(tmp_path)
    settings = TranslationSettings(num_shots=3, num_sentences=5)
    pairs = heldout_pairs(corpora, ["en", "el"], settings, seed=7, heldout_fraction=0.2)
    assert list(pairs["role"]) == ["shot"] * 3 + ["test"] * 5 and pairs["id"].is_unique
    assert all(row.text == row.pivot_text.replace("en ", "el ", 1) for row in pairs.itertuples())  # aligned by id
    train = sample_sequences(
        corpora, tiny_tokenizer(), num_tokens=300 * 30, seq_len=30, seed=7, heldout_fraction=0.2, languages=["en"], split="train"
    )["en"]
    trained_text = tiny_tokenizer().decode(train.flatten().tolist(), skip_special_tokens=True).replace(" ", "")
    assert trained_text.count("number") >= 250
    for text in pairs["pivot_text"]:
        assert f"number{text.split()[3]}is" not in trained_text  # its document number never appears in the training stream
    assert heldout_pairs(corpora, ["el"], settings, seed=7, heldout_fraction=0.2).equals(pairs)  # seeded, repeatable


def test_held_out_pairs_need_ids_and_enough_sentences(tmp_path):
    with pytest.raises(LayerMoEError, match="no id column"):
        heldout_pairs(parallel_corpus(tmp_path, with_ids=False), ["el"], TranslationSettings(), seed=0, heldout_fraction=0.2)
    with pytest.raises(LayerMoEError, match=r"8 shots \+ 500 test sentences need 508"):
        heldout_pairs(parallel_corpus(tmp_path), ["el"], TranslationSettings(num_sentences=500), seed=0, heldout_fraction=0.2)
    with pytest.raises(LayerMoEError, match="corpora for"):
        heldout_pairs(parallel_corpus(tmp_path), ["hu"], TranslationSettings(), seed=0, heldout_fraction=0.2)


def test_translation_prompts_use_the_reference_format_with_shots_one_per_line(tmp_path):
    settings = TranslationSettings(num_shots=2, num_sentences=2, max_new_tokens=5)
    pairs = heldout_pairs(parallel_corpus(tmp_path), ["el"], settings, seed=0, heldout_fraction=0.2)
    model = tiny_model("llama", max_position_embeddings=512)
    table = translate_pairs(model, tiny_tokenizer(), pairs, settings)
    assert list(table.columns) == TRANSLATION_COLUMNS
    assert list(table["direction"]) == ["en-el", "en-el", "el-en", "el-en"]
    shots, first_test = pairs[pairs.role == "shot"], pairs[pairs.role == "test"].iloc[0]
    prompt = "".join(f"Translation: Greek: {s.text} English: {s.pivot_text}\n" for s in shots.itertuples())
    prompt += f"Translation: Greek: {first_test.text} English:"
    expected = greedy_generate(model, tiny_tokenizer(), [prompt], max_new_tokens=5, first_line=True)[0]
    assert table.iloc[2]["hypothesis"] == expected and table.iloc[2]["reference"] == first_test.pivot_text
    assert not table["hypothesis"].str.contains("\n").any()


def test_shots_that_do_not_fit_the_context_are_dropped_earliest_first():
    shots = [f"Translation: English: shot {i} English: {i}" for i in range(4)]  # 39 characters, one token each
    query = "Translation: English: query English:"  # 36
    assert fitted_prompt(shots, query, tiny_tokenizer(), budget=4 * 40 + 36) == "".join(f"{s}\n" for s in shots) + query
    assert fitted_prompt(shots, query, tiny_tokenizer(), budget=2 * 40 + 36) == f"{shots[2]}\n{shots[3]}\n{query}"
    assert fitted_prompt(shots, query, tiny_tokenizer(), budget=2 * 40 + 35) == f"{shots[3]}\n{query}"
    assert fitted_prompt(shots, query, tiny_tokenizer(), budget=35) is None  # not even the query fits


def test_sentences_too_long_for_the_context_are_left_out_of_the_score(tmp_path):
    corpora = parallel_corpus(tmp_path)
    settings = TranslationSettings(num_shots=1, num_sentences=4, max_new_tokens=4)
    pairs = heldout_pairs(corpora, ["el"], settings, seed=0, heldout_fraction=0.2)
    long_id = pairs[pairs.role == "test"]["id"].iloc[0]
    pairs.loc[pairs["id"] == long_id, "text"] = "el " + "word " * 30  # > 60 characters: no prompt in el-en fits 64 positions
    table = translate_pairs(tiny_model("llama"), tiny_tokenizer(), pairs, settings)  # context 64
    assert long_id not in set(table.loc[table.direction == "el-en", "id"])
    metrics = translation_metrics(table).set_index("metric")["n"]
    assert metrics["translation.el-en.chrfpp"] < 4


def test_chrf_is_100_for_exact_translations_and_lower_for_wrong_ones():
    translations = pd.DataFrame(
        [
            {
                "language": "el",
                "direction": "en-el",
                "id": "1",
                "source": "a",
                "reference": "καλημέρα κόσμε",
                "hypothesis": "καλημέρα κόσμε",
            },
            {
                "language": "el",
                "direction": "el-en",
                "id": "1",
                "source": "a",
                "reference": "good morning world",
                "hypothesis": "good evening",
            },
        ]
    )
    table = translation_metrics(translations).set_index("metric")
    assert table.loc["translation.en-el.chrfpp", "value"] == pytest.approx(100.0)
    assert 0 < table.loc["translation.el-en.chrfpp", "value"] < 100
    assert set(table["language"]) == {"el"} and set(table["n"]) == {1}


def test_evaluate_model_adds_translation_rows_and_needs_pairs(tmp_path):
    settings = EvalSettings(translation=TranslationSettings(num_shots=1, num_sentences=2, max_new_tokens=4))
    pairs = heldout_pairs(parallel_corpus(tmp_path), ["en", "el"], settings.translation, seed=0, heldout_fraction=0.2)
    model = tiny_model("qwen2", max_position_embeddings=256)
    sequences = {lang: torch.randint(3, 70, (2, 8), generator=torch.Generator().manual_seed(0)) for lang in ["en", "el"]}
    table = evaluate_model(model, tiny_tokenizer(), sequences, settings, pairs)
    chrf = table[table.metric.str.startswith("translation.")]
    assert list(zip(chrf.language, chrf.metric, chrf.n)) == [("el", "translation.en-el.chrfpp", 2), ("el", "translation.el-en.chrfpp", 2)]
    assert chrf["value"].between(0, 100).all()
    with pytest.raises(LayerMoEError, match="no pairs were given"):
        evaluate_model(model, tiny_tokenizer(), sequences, settings)


def test_continuation_prompts_are_held_out_sentence_openings(tmp_path):
    corpora = parallel_corpus(tmp_path)
    prompts = continuation_prompts(corpora, ["en", "el"], per_language=2, seed=3, heldout_fraction=0.2)
    assert list(prompts["language"]) == ["en", "en", "el", "el"]
    for row in prompts.itertuples():
        assert row.reference.startswith(row.prompt) and len(row.prompt.split()) == len(row.reference.split()) // 2
    held_out = heldout_pairs(corpora, ["el"], TranslationSettings(num_shots=0, num_sentences=60), seed=3, heldout_fraction=0.2)
    assert set(prompts["id"]) <= set(held_out["id"])
    assert continuation_prompts(corpora, ["en"], per_language=0, seed=3, heldout_fraction=0.2).empty


def test_old_language_chrf_gate_bounds_the_drop_in_points():
    comparison = pd.DataFrame(
        [
            {"language": "en", "group": "old", "metric": "loss", "parent": 2.0, "child": 2.0, "delta": 0.0},
            {"language": "el", "group": "old", "metric": "translation.en-el.chrfpp", "parent": 30.0, "child": 27.0, "delta": -3.0},
            {"language": "hu", "group": "new", "metric": "loss", "parent": 5.0, "child": 4.0, "delta": -1.0},
            {"language": "hu", "group": "new", "metric": "translation.en-hu.chrfpp", "parent": 5.0, "child": 1.0, "delta": -4.0},
        ]
    )
    assert evaluate_gates(comparison, GateSettings()).passed  # no chrF bound by default
    decision = evaluate_gates(comparison, GateSettings(max_old_chrf_drop=2.0))
    assert not decision.passed
    assert decision.reasons == [
        "old language el: translation.en-el.chrfpp 30.00 -> 27.00 (-3.00 points) exceeds the allowed drop of 2.00 points"
    ]
    assert evaluate_gates(comparison, GateSettings(max_old_chrf_drop=3.0)).passed


def test_seed_summary_gives_mean_and_sample_std_per_variant(tmp_path):
    parent = metrics_table({"el": 4.0, "en": 2.0}, {})
    runs = {}
    for seed, (el, en) in enumerate([(3.0, 2.1), (3.2, 2.3), (3.4, 2.2)]):
        runs[f"layermoe/{seed}"] = {
            "variant": "layermoe",
            "seed": seed,
            "allocation": [3, 1, 2],
            "params_added": 600,
            "comparison": compare_models(parent, metrics_table({"el": el, "en": en}, {}), ["en"], ["el"]),
        }
    runs["uniform/0"] = {
        "variant": "uniform",
        "seed": 0,
        "allocation": [5, 5, 5],
        "params_added": 1500,
        "comparison": compare_models(parent, metrics_table({"el": 3.5, "en": 2.0}, {}), ["en"], ["el"]),
    }
    per_seed = compare_variants(runs)
    assert list(zip(per_seed.variant, per_seed.seed)) == [("layermoe", 0), ("layermoe", 1), ("layermoe", 2), ("uniform", 0)]
    table = summarise_seeds(per_seed).set_index("variant")
    assert table.loc["layermoe", "seeds"] == 3 and table.loc["uniform", "seeds"] == 1
    assert table.loc["layermoe", "new_gain"] == pytest.approx(0.8) and table.loc["layermoe", "new_gain_std"] == pytest.approx(0.2)
    assert table.loc["layermoe", "old_drift"] == pytest.approx(0.2) and table.loc["layermoe", "old_drift_std"] == pytest.approx(0.1)
    assert table.loc["layermoe", "loss_delta:el_std"] == pytest.approx(0.2)
    assert math.isnan(table.loc["uniform", "new_gain_std"])  # one seed says nothing about noise
    assert plot_variant_comparison(table.reset_index(), tmp_path / "variants.png").stat().st_size > 0


def test_compare_with_seeds_runs_every_variant_at_each_training_seed(tmp_path):
    from flows.compare import ComparePlan, variant_plans

    (tmp_path / "el.txt").write_text("καλημέρα κόσμε\n", encoding="utf-8")
    plan = ComparePlan.model_validate(
        {"new_languages": ["el"], "corpora": {"el": {"path": tmp_path / "el.txt"}}, "name": "cmp", "seeds": 3, "stage1": {"seed": 5}}
    )
    plans = variant_plans(plan, num_layers=4)
    assert sorted(plans) == sorted((v, s) for v in ("layermoe", "uniform", "no_classifier") for s in range(3))
    assert [plans["uniform", s].stage1.seed for s in range(3)] == [5, 6, 7]
    assert [plans["uniform", s].stage2.seed for s in range(3)] == [0, 1, 2]
    assert {p.tokens.seed for p in plans.values()} == {plan.tokens.seed}  # same data, so the same held-out text
    assert [plans["layermoe", s].promote_alias for s in range(3)] == [
        "compare-layermoe",
        "compare-layermoe-seed1",
        "compare-layermoe-seed2",
    ]
    assert len({p.name for p in plans.values()}) == 9


def test_cli_refuses_a_seed_count_below_one(tmp_path, capsys):
    from flows.cli import main

    with pytest.raises(SystemExit):
        main(["compare", "--plan", str(tmp_path / "plan.yaml"), "--seeds", "0"])
    assert "'0' is not a whole number of at least 1" in capsys.readouterr().err


def test_continuations_show_text_even_where_the_model_would_end_the_document_at_once():
    model, tokenizer = tiny_model("qwen2"), tiny_tokenizer()
    prompt = "the quick brown fox"
    with torch.no_grad():
        first = model(input_ids=torch.tensor([tokenizer.encode(prompt)])).logits[0, -1].argmax().item()
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(first)  # the model's greedy next token now ends the document
    assert greedy_generate(model, tokenizer, [prompt], max_new_tokens=6) == [""]
    prompts = pd.DataFrame({"language": ["en"], "prompt": [prompt]})
    (text,) = continue_prompts(model, tokenizer, prompts, EvalSettings(continuation_tokens=6))
    assert text.strip()
