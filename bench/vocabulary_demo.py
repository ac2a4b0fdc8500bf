"""The vocabulary extension at demo size (issue 32, item 5): one round with and without `vocabulary: {extend: N}`.

Run from the repository root, one thread:

    OMP_NUM_THREADS=1 python -m bench.vocabulary_demo --workdir /tmp/vocabulary-demo --extend 2000 \
        --plot docs/img/vocabulary-demo.png

1. The base: the demo's base (flows.demo sizes), but its tokenizer and its weights see en/es/zh only (the bootstrap
   plan's corpora are those three, with no exposure), so Bengali and Devanagari fall back to byte tokens.
2. Two rounds from that base (version 1) add bn/hi/ne through the add-languages flow into the workdir's sqlite
   registry: `plain` keeps the parent's tokenizer; `extended` adds up to N merges. Each version takes an alias of its
   own, so neither is the other's parent. Same Stage-1 text in bytes: `plain` samples the demo's Stage-1 tokens per
   language; the bench first builds the extended tokenizer with the flow's own step (the round rebuilds the same one)
   and gives `extended` the token count that holds as many bytes of the new languages' training text. The bytes each
   Stage 1 read are then counted from its sample. Stage 2 samples the same token count in both rounds.
3. Measured on the versions downloaded from the registry:
   - fertility (tokens per character) of each new language's held-out text, parent's and extended tokenizer;
   - bits per byte on the same held-out documents (200 a language), parent, plain child and extended child;
   - old-language drift: each round's own evaluation (loss delta child - parent, plain routing and pinned);
   - Stage-1 training bytes/s: each round's Stage-1 job re-run for `--train-steps` steps on its own sample,
     plain and extended in turn, `--repeats` times;
   - decoding bytes/s: greedy continuations of held-out new-language openings, `--new-tokens` tokens each, plain and
     extended children in turn, `--repeats` times; bytes are those of the generated tokens.
   Throughputs are medians with the min-max over repeats. Bytes of a token are its byte-level BPE string's length
   (the demo tokenizer's alphabet is one character per byte).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

BASE_LANGUAGES = ["en", "es", "zh"]
NEW_LANGUAGES = ["bn", "hi", "ne"]
VARIANTS = ("plain", "extended")
MODEL_NAME = "layermoe-vocabulary-demo"
# Per language. The demo's base takes 250k; a tokenizer of en/es/zh alone packs zh's train split into about 242k.
BASE_TRAIN_TOKENS = 220_000


# -- building: base and the two rounds ----------------------------------------------------
def build(workdir: Path, extend: int, quick: bool) -> dict:
    """Corpus, base and both rounds in `workdir` (each reused when already there); returns the run record."""
    from layermoe_core.environment import use_local_stack

    use_local_stack(workdir / "prefect", ephemeral=True)
    import yaml

    from demo.offline_corpus import DEFAULT_PACKAGES
    from flows.add_languages import add_languages
    from flows.bootstrap_base import BootstrapPlan, bootstrap_base
    from flows.demo import demo_plans
    from flows.plan import ExpansionPlan
    from tasks.bootstrap import build_corpus

    record_path = workdir / "record.json"
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.exists() else {}
    from flows.demo import BASE_LANGUAGES as DEMO_BASE
    from flows.demo import ROUNDS as DEMO_ROUNDS

    demo_languages = DEMO_BASE + [language for group in DEMO_ROUNDS for language in group]  # the demo's plans name all nine
    corpora = build_corpus(workdir / "corpus", demo_languages, list(DEFAULT_PACKAGES))
    base_plan, lifelong = demo_plans(workdir, corpora, quick=quick)
    registry = {**base_plan.registry.model_dump(mode="json"), "registered_model_name": MODEL_NAME}
    base = BootstrapPlan.model_validate(
        {
            **base_plan.model_dump(mode="json"),
            "registry": registry,
            "corpora": {lang: corpora[lang].model_dump(mode="json") for lang in BASE_LANGUAGES},
            "exposure_tokens": 0,
            "train_tokens": min(base_plan.train_tokens, BASE_TRAIN_TOKENS),
        }
    )
    record["base_version"] = bootstrap_base(base)
    shared = lifelong.model_dump(mode="json", exclude={"name", "parent", "rounds"})
    shared["registry"] = registry
    # No translation: it measures neither cost the extension changes, and it is the slowest evaluation step.
    shared["evaluation"]["translation"] = None
    plans = {}
    for variant in VARIANTS:
        plans[variant] = ExpansionPlan.model_validate(
            {
                **shared,
                "name": f"vocabulary-{variant}",
                "parent": {"version": record["base_version"]},
                "new_languages": NEW_LANGUAGES,
                "promote_alias": f"vocabulary-{variant}",
                "vocabulary": {"extend": extend if variant == "extended" else 0},
            }
        )
    plain_tokens = plans["plain"].tokens.stage1_tokens
    stage1_tokens, eval_tokens = extended_budgets(plans["plain"], record["base_version"], extend)
    record["stage1_tokens"] = {"plain": plain_tokens, "extended": stage1_tokens}
    record["eval_tokens"] = {"plain": plans["plain"].tokens.eval_tokens, "extended": eval_tokens}
    plans["extended"] = plans["extended"].model_copy(
        update={"tokens": plans["extended"].tokens.model_copy(update={"stage1_tokens": stage1_tokens, "eval_tokens": eval_tokens})}
    )
    for variant, plan in plans.items():
        (workdir / f"{variant}-plan.yaml").write_text(yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        if variant not in record.get("versions", {}):
            summary = add_languages(plan)
            record.setdefault("versions", {})[variant] = summary.version
            record.setdefault("comparison", {})[variant] = summary.comparison
            record.setdefault("allocation", {})[variant] = summary.allocation
            record_path.write_text(json.dumps(record, indent=1), encoding="utf-8")
    record["tracking_uri"] = base.registry.tracking_uri
    return record


def extended_budgets(plan, base_version: int, extend: int) -> tuple[int, int]:
    """The extended round's Stage-1 and evaluation tokens a language.

    Stage 1: as many bytes of the new languages' training text as the plain round's `stage1_tokens` hold under the
    parent's tokenizer (one count serves every new language, so the total is matched). Evaluation: the plain round's,
    or one row less than the smallest new language's held-out split holds under the extended tokenizer.
    """
    from layermoe_core.evaluation.heldout_text import heldout_texts
    from layermoe_core.model.checkpoints import load_tokenizer
    from tasks.analysis import VOCABULARY_DOCUMENTS, extend_vocabulary
    from tasks.parent import resolve_parent

    work = plan.workdir.resolve()
    parent = resolve_parent(plan.registry, base_version, work / "registry-downloads")
    extended_dir = extend_vocabulary(
        parent.path,
        plan.corpora,
        BASE_LANGUAGES,
        NEW_LANGUAGES,
        extend,
        seed=plan.tokens.seed,
        heldout_fraction=plan.tokens.heldout_fraction,
        out_dir=work / "bench-extended-tokenizer",
    )
    texts = {
        language: list(heldout_texts(plan.corpora[language], plan.tokens.seed, plan.tokens.heldout_fraction, split="train").values())[
            :VOCABULARY_DOCUMENTS
        ]
        for language in NEW_LANGUAGES
    }

    def bytes_per_token(tokenizer_dir: Path) -> float:
        """Each new language's training-text bytes over its tokens, summed over the languages."""
        tokenizer = load_tokenizer(tokenizer_dir)
        total = 0.0
        for documents in texts.values():
            tokens = sum(len(ids) for ids in tokenizer(documents, add_special_tokens=False)["input_ids"])
            total += sum(len(text.encode("utf-8")) for text in documents) / tokens
        return total

    seq_len = plan.tokens.seq_len
    tokens = plan.tokens.stage1_tokens * bytes_per_token(parent.path) / bytes_per_token(extended_dir)
    extended = load_tokenizer(extended_dir)
    heldout = min(
        sum(len(ids) + 1 for ids in extended(documents, add_special_tokens=False)["input_ids"])  # each document and its EOS
        for documents in (
            list(heldout_texts(plan.corpora[language], plan.tokens.seed, plan.tokens.heldout_fraction).values())
            for language in NEW_LANGUAGES
        )
    )
    return max(seq_len, round(tokens / seq_len) * seq_len), min(plan.tokens.eval_tokens, (heldout // seq_len - 1) * seq_len)


# -- measuring --------------------------------------------------------------------------
def token_bytes(tokenizer, ids) -> int:
    """UTF-8 bytes the ids stand for, special tokens left out: a byte-level BPE token's string has a character a byte."""
    special = set(tokenizer.all_special_ids)
    return sum(len(token) for i, token in zip(ids, tokenizer.convert_ids_to_tokens(list(ids))) if i not in special)


def round_dirs(workdir: Path) -> dict[str, Path]:
    """Each variant's round folder (flows.add_languages.round_dir)."""
    found = {variant: sorted((workdir / "work").glob(f"vocabulary-{variant}-parent-v*")) for variant in VARIANTS}
    return {variant: paths[-1] for variant, paths in found.items()}


def stage1_sample(round_dir: Path) -> Path:
    extended = round_dir / "child-tokens" / "stage1.json"
    return extended if extended.exists() else round_dir / "tokens" / "stage1.json"


def stage1_bytes(tokenizer, sample: Path) -> dict[str, int]:
    """Bytes of text per language in a Stage-1 sample."""
    from layermoe_core.data.corpus import open_sequences

    return {lang: token_bytes(tokenizer, rows[:].flatten().tolist()) for lang, rows in open_sequences(sample).items()}


def train_throughput(
    models: dict[str, Path], rounds: dict[str, Path], plans: dict, record: dict, parent: Path, steps: int, repeats: int
) -> pd.DataFrame:
    """Stage-1 bytes/s: each round's Stage-1 job for `steps` steps on its own sample, the variants in turn."""
    from layermoe_core.data.corpus import open_sequences
    from layermoe_core.model.checkpoints import load_tokenizer
    from layermoe_core.training.launch import Stage1Job

    rows = []
    for repeat in range(repeats):
        for variant in VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]:
            plan = plans[variant]
            sample = stage1_sample(rounds[variant])
            tokenizer = load_tokenizer(models[variant])
            sequences = open_sequences(sample)
            bytes_per_row = sum(stage1_bytes(tokenizer, sample).values()) / sum(len(r) for r in sequences.values())
            settings = plan.stage1.model_copy(update={"max_steps": steps, "save_steps": 10 * steps, "logging_steps": steps})
            with tempfile.TemporaryDirectory(prefix="vocabulary-demo-train-") as output:
                job = Stage1Job(
                    parent_dir=parent,
                    tokenizer_dir=models[variant],
                    allocation=record["allocation"][variant],
                    old_languages=BASE_LANGUAGES,
                    new_languages=NEW_LANGUAGES,
                    top_k=plan.top_k,
                    tokens_path=sample,
                    settings=settings,
                    output_dir=Path(output),
                    extend_vocabulary=variant == "extended",
                )
                result = job.run([])
            runtime = next(entry["train_runtime"] for entry in result.log_history if "train_runtime" in entry)
            size = steps * settings.per_device_batch_size * bytes_per_row
            rows.append({"variant": variant, "repeat": repeat, "seconds": runtime, "bytes_per_s": size / runtime})
    return pd.DataFrame(rows)


def decode_throughput(models: dict[str, Path], prompts: list[str], new_tokens: int, repeats: int) -> pd.DataFrame:
    """Decoding bytes/s of greedy continuations (batch 1, EOS suppressed so every one is `new_tokens` long), the
    children in turn; bytes are those of the generated tokens."""
    import torch

    from layermoe_core.model.checkpoints import load_model, load_tokenizer

    loaded = {variant: (load_model(path, device="cpu"), load_tokenizer(path)) for variant, path in models.items()}
    rows = []
    for repeat in range(repeats):
        for variant in VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]:
            model, tokenizer = loaded[variant]
            size, count, start = 0, 0, time.perf_counter()
            with torch.inference_mode():
                for prompt in prompts:
                    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
                    out = model.generate(
                        ids,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        pad_token_id=tokenizer.eos_token_id,
                    )
                    generated = out[0, ids.shape[1] :].tolist()
                    size, count = size + token_bytes(tokenizer, generated), count + len(generated)
            seconds = time.perf_counter() - start
            rows.append(
                {"variant": variant, "repeat": repeat, "seconds": seconds, "bytes_per_s": size / seconds, "bytes_per_token": size / count}
            )
    return pd.DataFrame(rows)


def spread(table: pd.DataFrame, column: str = "bytes_per_s") -> dict[str, str]:
    """Per variant: `median (min-max)`."""
    return {
        variant: f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"
        for variant, values in table.groupby("variant")[column].apply(list).items()
    }


def measure(workdir: Path, record: dict, train_steps: int, new_tokens: int, prompts_per_language: int, repeats: int) -> dict:
    """Every figure of the table, from the versions downloaded from the registry (see the module docstring)."""
    from flows.plan import ExpansionPlan, load_plan
    from layermoe_core.analysis.fertility import fertility_table
    from layermoe_core.evaluation.heldout_text import heldout_texts
    from layermoe_core.evaluation.metrics import bits_per_byte
    from layermoe_core.model.checkpoints import load_model, load_tokenizer
    from registry import RegistrySettings, cached_version
    from tasks.analysis import FERTILITY_DOCUMENTS
    from tasks.evaluation import BITS_PER_BYTE_DOCUMENTS

    settings = RegistrySettings(tracking_uri=record["tracking_uri"], registered_model_name=MODEL_NAME)
    downloads = workdir / "bench-downloads"
    parent = cached_version(settings, record["base_version"], downloads).path
    models = {variant: cached_version(settings, record["versions"][variant], downloads).path for variant in VARIANTS}
    rounds = round_dirs(workdir)
    plans = {variant: load_plan(workdir / f"{variant}-plan.yaml", ExpansionPlan) for variant in VARIANTS}
    tokens = plans["plain"].tokens
    heldout = {
        lang: list(heldout_texts(plans["plain"].corpora[lang], tokens.seed, tokens.heldout_fraction).values())
        for lang in BASE_LANGUAGES + NEW_LANGUAGES
    }

    fertility = fertility_table(
        load_tokenizer(parent),
        {lang: texts[:FERTILITY_DOCUMENTS] for lang, texts in heldout.items()},
        NEW_LANGUAGES,
        load_tokenizer(models["extended"]),
    ).set_index("language")

    documents = {lang: texts[:BITS_PER_BYTE_DOCUMENTS] for lang, texts in heldout.items()}
    seq_len = tokens.seq_len - 1  # the context the flow measures bits per byte in
    bits = {}
    for name, path in {"parent": parent, **models}.items():
        table = bits_per_byte(load_model(path, device="cpu"), load_tokenizer(path), documents, seq_len=seq_len, batch_size=16)
        bits[name] = table.set_index("language")["value"]

    drift = {}
    for variant in VARIANTS:
        comparison = pd.DataFrame(record["comparison"][variant])
        old = comparison[comparison["group"] == "old"].pivot(index="language", columns="metric", values="delta")
        drift[variant] = old[["loss", "pinned_loss"]]

    trained = {variant: stage1_bytes(load_tokenizer(models[variant]), stage1_sample(rounds[variant])) for variant in VARIANTS}
    training = train_throughput(models, rounds, plans, record, parent, train_steps, repeats)
    prompts = [text[:40] for lang in NEW_LANGUAGES for text in heldout[lang][:prompts_per_language]]
    decoding = decode_throughput(models, prompts, new_tokens, repeats)
    return {
        "fertility": fertility,
        "bits": pd.DataFrame(bits),
        "drift": drift,
        "trained_bytes": trained,
        "training": training,
        "decoding": decoding,
    }


# -- reporting --------------------------------------------------------------------------
def markdown(record: dict, figures: dict) -> str:
    fertility, bits, drift = figures["fertility"], figures["bits"], figures["drift"]
    lines = [
        "| new language | tokens/char, parent tokenizer | tokens/char, extended | bits/byte, parent | plain child | extended child "
        "| gain, plain | gain, extended | Stage-1 bytes, plain | Stage-1 bytes, extended |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lang in NEW_LANGUAGES:
        f, b = fertility.loc[lang], bits.loc[lang]
        lines.append(
            f"| {lang} | {f.tokens_per_char:.2f} | {f.child_tokens_per_char:.2f} | {b.parent:.3f} | {b.plain:.3f} | {b.extended:.3f} "
            f"| {b.parent - b.plain:+.3f} | {b.parent - b.extended:+.3f} "
            f"| {figures['trained_bytes']['plain'][lang]:,} | {figures['trained_bytes']['extended'][lang]:,} |"
        )
    lines += [
        "",
        "| old language | plain round: drift, plain routing | pinned | extended round: drift, plain routing | pinned "
        "| bits/byte, parent | plain child | extended child |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lang in BASE_LANGUAGES:
        p, e, b = drift["plain"].loc[lang], drift["extended"].loc[lang], bits.loc[lang]
        lines.append(
            f"| {lang} | {p.loss:+.4f} | {p.pinned_loss:+.4f} | {e.loss:+.4f} | {e.pinned_loss:+.4f} "
            f"| {b.parent:.3f} | {b.plain:.3f} | {b.extended:.3f} |"
        )
    train, decode = spread(figures["training"]), spread(figures["decoding"])
    per_token = figures["decoding"].groupby("variant")["bytes_per_token"].mean()
    lines += [
        "",
        "| throughput (median, min-max over repeats) | plain | extended |",
        "|---|---:|---:|",
        f"| Stage-1 training, bytes/s | {train['plain']} | {train['extended']} |",
        f"| decoding new-language text, bytes/s | {decode['plain']} | {decode['extended']} |",
        f"| decoding, bytes per generated token | {per_token['plain']:.2f} | {per_token['extended']:.2f} |",
        f"| Stage-1 tokens a language (same bytes) | {record['stage1_tokens']['plain']:,} | {record['stage1_tokens']['extended']:,} |",
    ]
    return "\n".join(lines)


def plot(figures: dict, path: Path, title: str) -> Path:
    """Three panels: tokens per character, bits per byte (new languages), and the two throughputs relative to plain."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12.0, 3.6), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    left, middle, right = figure.subplots(1, 3, width_ratios=[1, 1.4, 1])
    positions = range(len(NEW_LANGUAGES))
    fertility, bits = figures["fertility"].loc[NEW_LANGUAGES], figures["bits"].loc[NEW_LANGUAGES]
    width = 0.4
    for offset, column, label, color in (
        (-1, "tokens_per_char", "parent's tokenizer", "tab:gray"),
        (1, "child_tokens_per_char", "extended", "tab:blue"),
    ):
        bars = left.bar([p + offset * width / 2 for p in positions], fertility[column], width, color=color, label=label)
        left.bar_label(bars, fmt="%.2f", fontsize=7)
    left.set_xticks(list(positions), NEW_LANGUAGES)
    left.set(ylabel="tokens per character", title="Fertility, held-out text")
    left.legend(fontsize=8)
    width = 0.27
    for offset, (column, label, color) in enumerate(
        (("parent", "parent", "tab:gray"), ("plain", "plain child", "tab:red"), ("extended", "extended child", "tab:blue")), start=-1
    ):
        bars = middle.bar([p + offset * width for p in positions], bits[column], width, color=color, label=label)
        middle.bar_label(bars, fmt="%.2f", fontsize=7)
    middle.set_xticks(list(positions), NEW_LANGUAGES)
    middle.set(ylabel="bits per byte (lower is better)", title="Held-out bits per byte, new languages")
    middle.margins(y=0.15)
    middle.legend(fontsize=8)
    labels, plain, extended = [], [], []
    for name, table in (("Stage-1 training", figures["training"]), ("decoding", figures["decoding"])):
        medians = table.groupby("variant")["bytes_per_s"].median()
        labels.append(name)
        plain.append(1.0)
        extended.append(medians["extended"] / medians["plain"])
    right.bar([p - 0.2 for p in range(2)], plain, 0.4, color="tab:red", label="plain")
    bars = right.bar([p + 0.2 for p in range(2)], extended, 0.4, color="tab:blue", label="extended")
    right.bar_label(bars, fmt="%.2fx", fontsize=8)
    right.set_xticks(range(2), labels)
    right.set(ylabel="bytes/s relative to plain", title="Throughput in bytes/s (medians)")
    right.margins(y=0.15)
    right.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="corpus, base, registry and rounds; reused when there")
    parser.add_argument("--extend", type=int, default=2000, help="vocabulary.extend of the extended round")
    parser.add_argument("--quick", action="store_true", help="the quick demo's sizes (a smoke test)")
    parser.add_argument("--train-steps", type=int, default=30, help="Stage-1 steps per throughput repeat")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per decoded continuation")
    parser.add_argument("--prompts", type=int, default=4, help="held-out openings per new language that are continued")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plot", type=Path, help="write the plot to this PNG")
    parser.add_argument("--title", default="bn/hi/ne on an en/es/zh base, with and without vocabulary extension")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    started = os.getloadavg()
    record = build(workdir, args.extend, args.quick)
    figures = measure(workdir, record, args.train_steps, args.new_tokens, args.prompts, args.repeats)
    pd.set_option("display.width", 200)
    print(figures["training"].to_string(index=False))
    print(figures["decoding"].to_string(index=False))
    print()
    print(markdown(record, figures))
    print(f"\nload average (1, 5, 15 min): at start {started}, at end {os.getloadavg()}")
    if args.plot is not None:
        print(f"plot: {plot(figures, args.plot, args.title)}")


if __name__ == "__main__":
    main()
