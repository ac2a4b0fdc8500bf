"""How a lifelong round's routers start and what pushes new-language tokens to the new experts.

Variants: "fresh" (router re-initialised, the reference's choice), "parent-rows" (parent rows copied,
new experts start at expert 0's row), each without the new-expert prior; "+prior" (plus the prior,
-log P(new experts) of new-language tokens, in Stage 1 (0.1) and Stage 2 (0.5): the demo's defaults,
so "parent-rows+prior" is the demo as it runs; or in Stage 1 only), and two ways
to keep the prior off the old languages: classifiers in every expanded layer (so old-classified tokens
take the frozen parent path everywhere), or a stronger LPR loss (1.0).

Run from the repository root after `make demo`:

    python -m bench.router_init --round-dir .demo/work/demo-round-2-parent-v2-<digest> --parent-dir .demo/work/registry-downloads/v2

It re-runs one finished round's Stage 1 and Stage 2 from its parent, on the round's own sampled
tokens (tokens/*.json), allocation and classifier layers, once per initialisation, with
the demo's stage settings, and prints side by side per language: held-out loss of parent and
child, and for the new languages the share of tokens whose top expert is one of the round's new
experts. Both variants see the same data in the same order (same seeds).
"""

import argparse
import tempfile
from pathlib import Path

import pandas as pd

from flows.demo import BASE_LANGUAGES, ROUNDS, demo_plans
from layermoe_core.analysis.routing_stats import routing_statistics
from layermoe_core.data.corpus import CorpusSpec, load_sequences
from layermoe_core.evaluation.metrics import language_perplexity
from layermoe_core.model.checkpoints import load_model
from layermoe_core.model.surgery import expand, insert_classifiers
from layermoe_core.training.trainer import train_stage1, train_stage2

NO_PRIOR = {"new_prior_coef": 0.0}
PRIOR = ({"router_init": "parent", "new_prior_coef": 0.1}, {"new_prior_coef": 0.5})  # the demo's defaults
VARIANTS = {  # name: (Stage-1 overrides, Stage-2 overrides, classifiers in every expanded layer)
    "fresh": ({"router_init": "fresh", **NO_PRIOR}, NO_PRIOR, False),
    "parent-rows": ({"router_init": "parent", **NO_PRIOR}, NO_PRIOR, False),
    "fresh+prior": ({**PRIOR[0], "router_init": "fresh"}, PRIOR[1], False),
    "parent-rows+prior": (*PRIOR, False),
    "parent-rows+stage1-prior": (PRIOR[0], NO_PRIOR, False),
    "parent-rows+prior+all-classifiers": (*PRIOR, True),
    "parent-rows+prior+lpr1": (PRIOR[0], {**PRIOR[1], "lpr_coef": 1.0}, False),
}


def run_variant(name: str, parent_dir: Path, round_dir: Path, out_dir: Path) -> tuple[pd.Series, pd.Series]:
    expansion = load_model(round_dir / "stage2" / "final").config.expansion_rounds[-1]
    old, new = expansion["old_languages"], expansion["new_languages"]
    languages = BASE_LANGUAGES + [lang for group in ROUNDS for lang in group]
    _, plan = demo_plans(Path(".demo"), {lang: CorpusSpec(path=Path(".demo/corpus") / f"{lang}.jsonl") for lang in languages})
    stage1_overrides, stage2_overrides, every_expanded_layer = VARIANTS[name]
    stage1 = plan.stage1.model_copy(update=stage1_overrides)
    stage2 = plan.stage2.model_copy(update=stage2_overrides)
    classifier_layers = expansion["classifier_layers"]
    if every_expanded_layer:
        classifier_layers = [layer for layer, count in enumerate(expansion["allocation"]) if count > 0]
    model = expand(load_model(parent_dir), expansion["allocation"], old, new, seed=stage1.seed, router_init=stage1.router_init)
    train_stage1(model, load_sequences(round_dir / "tokens" / "stage1.json"), stage1, out_dir / "stage1")
    insert_classifiers(model, classifier_layers, seed=stage2.seed)
    train_stage2(
        model,
        load_sequences(round_dir / "tokens" / "replay-old.json"),
        load_sequences(round_dir / "tokens" / "replay-new.json"),
        stage2,
        out_dir / "stage2",
    )
    heldout = load_sequences(round_dir / "tokens" / "heldout.json")
    losses = language_perplexity(model, heldout, batch_size=16).set_index("language")["loss"]
    routing = routing_statistics(model, {lang: heldout[lang] for lang in new}, old, batch_size=16)
    routing = routing[routing["num_experts"] > routing["num_old_experts"]]  # the layers the round expanded
    new_top1 = (1 - routing.groupby("language")["old_expert_fraction"].mean()).rename("new_expert_top1")
    return losses.rename(name), new_top1.rename(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round-dir", type=Path, required=True, help="a finished round's work folder")
    parser.add_argument("--parent-dir", type=Path, required=True, help="that round's parent model folder")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    heldout = load_sequences(args.round_dir / "tokens" / "heldout.json")
    parent_loss = language_perplexity(load_model(args.parent_dir), heldout, batch_size=16).set_index("language")["loss"]
    losses, top1 = [parent_loss.rename("parent model")], []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.variants:
            loss, new_top1 = run_variant(name, args.parent_dir, args.round_dir, Path(scratch) / name)
            losses.append(loss)
            top1.append(new_top1)
            print(f"done: {name}\n{pd.concat([loss, new_top1], axis=1).round(3).to_string()}", flush=True)
    table = pd.concat(losses, axis=1)
    for name in args.variants:
        table[f"{name} delta"] = table[name] - table["parent model"]
    print("Held-out loss (nats) per language, parent vs child per variant:\n")
    print(table.round(3).to_string())
    print("\nNew languages: share of tokens whose top expert is one of the round's new experts (mean over expanded layers):\n")
    print(pd.concat(top1, axis=1).round(3).to_string())


if __name__ == "__main__":
    main()
