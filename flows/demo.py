"""The embedded-default demo: everything local, no server, no hub.

It builds a parallel corpus from the gettext catalogs of named Debian packages, trains a
small Qwen2 base on en/es/zh, registers it, then runs two lifelong rounds (el/hu/tr, then
bn/hi/ne) into a local sqlite MLflow store, and prints parent-vs-child perplexities.
"""

from pathlib import Path

import pandas as pd
import yaml
from prefect import flow

from demo.offline_corpus import DEFAULT_PACKAGES
from layermoe_core.analysis.allocation import AllocationSettings
from layermoe_core.data.corpus import CorpusSpec
from layermoe_core.evaluation.gates import GateSettings
from layermoe_core.evaluation.metrics import EvalSettings
from layermoe_core.evaluation.translation import TranslationSettings
from layermoe_core.training.launch import LauncherSettings
from layermoe_core.training.trainer import Stage1Settings, Stage2Settings, TrainSettings
from registry.settings import RegistrySettings
from tasks.bootstrap import build_corpus

from .add_languages import RoundSummary
from .bootstrap_base import BootstrapPlan, bootstrap_base
from .lifelong_expansion import run_pending_rounds
from .plan import LifelongPlan, RoundSpec, TokenSettings

BASE_LANGUAGES = ["en", "es", "zh"]
ROUNDS = [["el", "hu", "tr"], ["bn", "hi", "ne"]]


def demo_registry(workdir: Path, tracking_uri: str | None = None) -> RegistrySettings:
    """The demo's store: a sqlite file in its workdir, or the `tracking_uri` a user passed (an MLflow server)."""
    return RegistrySettings(
        tracking_uri=tracking_uri or f"sqlite:///{workdir.resolve()}/mlflow.db",
        registered_model_name="layermoe-demo",
        experiment_name="layermoe-demo",
    )


def demo_plans(
    workdir: Path, corpora: dict[str, CorpusSpec], quick: bool = False, processes: int | None = None, tracking_uri: str | None = None
) -> tuple[BootstrapPlan, LifelongPlan]:
    """The demo's two plans; `quick` shrinks every size for a smoke test; `processes` launches every training run
    with that many processes (the batch sizes are per process)."""
    workdir = workdir.resolve()
    launcher = LauncherSettings(num_processes=processes) if processes else None
    registry = demo_registry(workdir, tracking_uri)
    scale = 0.1 if quick else 1.0
    tokens = TokenSettings(
        seq_len=128,
        analysis_tokens=int(15_000 * scale),
        stage1_tokens=int(120_000 * scale),
        stage2_tokens=int(16_000 * scale),
        eval_tokens=int(12_000 * scale),
    )
    base = BootstrapPlan(
        registry=registry,
        corpora=corpora,
        languages=BASE_LANGUAGES,
        vocab_size=2000 if quick else 8000,
        size="tiny" if quick else "demo",
        train_tokens=int(250_000 * scale),
        # The tokenizer covers all nine languages; a little text of each keeps the base's embeddings of their tokens
        # from staying random, as in a real multilingual base (the later rounds' languages are low-resource, not unseen).
        exposure_tokens=int(20_000 * scale),
        tokens=tokens,
        train=TrainSettings(
            learning_rate=2e-3, num_epochs=1, per_device_batch_size=16, warmup_ratio=0.05, logging_steps=20, save_steps=200
        ),
        launcher=launcher,
        workdir=workdir / "work",
    )
    lifelong = LifelongPlan(
        name="demo",
        registry=registry,
        corpora=corpora,
        tokens=tokens,
        # A barely trained quick base can show negative similarity in a layer: floor it there.
        allocation=AllocationSettings(method="layermoe", delta=6, clamp_similarity=1e-2 if quick else None),
        top_k=2,
        classifier_layer_count=2,
        stage1=Stage1Settings(
            learning_rate=1e-3, num_epochs=1, per_device_batch_size=16, warmup_ratio=0.05, logging_steps=20, save_steps=200
        ),
        # The demo's replay is small (16k tokens a language), so the review steps harder than the reference's 0.1s
        # (and the new-expert prior, LPR's mirror, with it).
        stage2=Stage2Settings(
            learning_rate=3e-3,
            num_epochs=3,
            per_device_batch_size=16,
            lpr_coef=0.5,
            new_prior_coef=0.5,
            classifier_coef=0.5,
            logging_steps=10,
            save_steps=200,
        ),
        # A 1.8M-parameter base drifts more per round than a real LLM: the demo allows 0.1 nats per old language.
        # At the quick run's size a round barely moves its new languages, so its gate checks old drift only and the
        # smoke test goes through both rounds (a rejected round stays pending, and the next would not start).
        # Translation to and from English on held-out gettext pairs: short strings, so 8 shots fit the 512-token context.
        evaluation=EvalSettings(
            batch_size=16,
            gates=GateSettings(max_old_loss_increase=0.1, require_new_improvement=not quick),
            translation=TranslationSettings(
                num_sentences=8 if quick else 40, max_chars=60 if quick else 120, max_new_tokens=24 if quick else 48, batch_size=16
            ),
        ),
        rounds=[RoundSpec(new_languages=langs) for langs in ROUNDS],
        launcher=launcher,
        workdir=workdir / "work",
    )
    return base, lifelong


@flow(name="demo", log_prints=True)
def demo(workdir: Path, quick: bool = False, processes: int | None = None, tracking_uri: str | None = None) -> list[RoundSummary]:
    """Build the corpus and the base, write the lifelong plan to `workdir/demo-plan.yaml`, and tick it until done."""
    languages = BASE_LANGUAGES + [lang for group in ROUNDS for lang in group]
    corpus_dir = workdir.resolve() / "corpus"
    corpora = build_corpus(corpus_dir, languages, list(DEFAULT_PACKAGES))
    base_plan, lifelong_plan = demo_plans(workdir, corpora, quick, processes, tracking_uri)
    bootstrap_base(base_plan)
    plan_file = workdir.resolve() / "demo-plan.yaml"
    plan_file.write_text(yaml.safe_dump(lifelong_plan.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return [tick.summary for tick in run_pending_rounds(plan_file) if tick.summary is not None]


def print_report(summaries: list[RoundSummary], tracking_uri: str) -> None:
    for metric, title in (("perplexity", "held-out perplexity"), (".chrfpp", "translation chrF++ (0-100), 8-shot, held-out pairs")):
        rows = []
        for s in summaries:
            table = s.table()
            table = table[table["metric"].str.endswith(metric)]
            rows += [
                {
                    "version": s.version,
                    "parent": s.parent_version,
                    "language": r.language,
                    "group": r.group,
                    "metric": r.metric,
                    "parent_value": round(r.parent, 2),
                    "child_value": round(r.child, 2),
                    "promoted": s.promoted,
                }
                for r in table.itertuples()
            ]
        print(f"\nPer-language {title}, parent vs child:\n")
        print(pd.DataFrame(rows).to_string(index=False))
    ui = tracking_uri if tracking_uri.startswith("http") else f"mlflow ui --backend-store-uri {tracking_uri}, then http://127.0.0.1:5000"
    print(
        f"\nBrowse the versions: {ui} -> Models -> layermoe-demo (each version's run holds the tables "
        "`evaluation` and `samples`, parent vs child continuations of held-out sentences)"
    )


def run_demo(workdir: str | Path, quick: bool = False, processes: int | None = None, tracking_uri: str | None = None) -> list[RoundSummary]:
    summaries = demo(Path(workdir), quick, processes, tracking_uri)
    print_report(summaries, demo_registry(Path(workdir), tracking_uri).tracking_uri)
    return summaries
