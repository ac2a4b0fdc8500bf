"""Every allocation signal on the demo's base and data, side by side: the variants table of docs/results.md.

Run from the repository root: `python -m bench.compare_signals --workdir .signals`. It builds
the demo corpus (Debian gettext catalogs, as `make demo`; pass `--download-dir` to reuse .debs),
trains and registers the demo base (en, es, zh; the demo's own settings; `--scale` shrinks every
token budget, the base's training included), then runs
`compare` for round el/hu/tr with the variants layermoe, uniform, neuron, param_delta,
late_layers and no_classifier, with the demo's Stage-1/2 settings and delta 6 on equal
budgets. It prints the variants table as markdown and writes it to WORKDIR/variants.csv and
.md (each variant's signal table is registered with its version). Everything is local: an
ephemeral Prefect in WORKDIR/prefect and a sqlite MLflow store in WORKDIR/mlflow.db.
"""

from __future__ import annotations

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path

from layermoe_core.environment import use_local_stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".signals"))
    parser.add_argument("--download-dir", type=Path, default=None, help="cached .debs of the demo packages")
    parser.add_argument("--variants", default="layermoe,uniform,neuron,param_delta,late_layers,no_classifier")
    parser.add_argument("--delta", type=int, default=6)
    parser.add_argument("--neurons-per-language", type=int, default=100, help="of the demo base's 4 x 384 MLP neurons")
    parser.add_argument("--scale", type=float, default=1.0, help="times every token budget (base training included); 1.0: the demo's")
    parser.add_argument("--round-scale", type=float, default=None, help="times the round's token budgets (default: --scale)")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    use_local_stack(workdir / "prefect", ephemeral=True)  # Prefect and MLflow stay local and quiet; before they are imported

    from demo.offline_corpus import DEFAULT_PACKAGES, build_gettext_corpus
    from flows.bootstrap_base import bootstrap_base
    from flows.compare import ComparePlan, compare, with_variants
    from flows.demo import BASE_LANGUAGES, ROUNDS, demo_plans
    from flows.plan import ParentRef
    from layermoe_core.data.corpus import CorpusSpec
    from registry.listing import list_versions

    languages = BASE_LANGUAGES + [lang for group in ROUNDS for lang in group]  # all nine, as the demo's tokenizer
    start = time.perf_counter()
    corpus_dir = build_gettext_corpus(workdir / "corpus", languages, list(DEFAULT_PACKAGES), args.download_dir)
    corpora = {lang: CorpusSpec(path=corpus_dir / f"{lang}.jsonl") for lang in languages}
    base_plan, lifelong = demo_plans(workdir, corpora)

    def scaled(scale: float):
        return base_plan.tokens.model_copy(
            update={
                key: max(1, int(getattr(base_plan.tokens, key) * scale))
                for key in ("analysis_tokens", "stage1_tokens", "stage2_tokens", "eval_tokens")
            }
        )

    lifelong = lifelong.model_copy(update={"tokens": scaled(args.round_scale or args.scale)})
    base_plan = base_plan.model_copy(update={"tokens": scaled(args.scale), "train_tokens": int(base_plan.train_tokens * args.scale)})
    versions = list_versions(base_plan.registry) if (workdir / "mlflow.db").exists() else None
    base_version = 1 if versions is not None and len(versions) else bootstrap_base(base_plan)
    print(f"corpus and base ready in {time.perf_counter() - start:.0f} s (base version {base_version})", flush=True)

    shared = lifelong.round_plan(0, BASE_LANGUAGES, ParentRef(version=base_version)).model_dump()
    shared["allocation"].update(
        delta=args.delta,
        neurons_per_language=args.neurons_per_language,
        finetune_steps=10,
        finetune_learning_rate=1e-3,
        finetune_batch_size=16,
    )
    plan = with_variants(
        ComparePlan.model_validate({**shared, "name": "signals", "workdir": workdir / "compare"}), args.variants.split(",")
    )
    start = time.perf_counter()
    table = compare(plan)
    print(f"compare took {time.perf_counter() - start:.0f} s", flush=True)

    table.to_csv(workdir / "variants.csv", index=False)
    shown = table.copy()
    for column in shown.columns:
        if column.startswith(("old_drift", "new_gain", "loss_delta")):
            shown[column] = shown[column].map(lambda v: f"{v:+.3f}")
    markdown = shown.to_markdown(index=False, disable_numparse=True)
    (workdir / "variants.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
