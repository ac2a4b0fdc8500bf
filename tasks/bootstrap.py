"""Tasks that make the demo's base model: corpus, tokenizer, trained dense base."""

from pathlib import Path

from prefect import get_run_logger, task

from demo.base import demo_base_config, train_demo_tokenizer
from demo.offline_corpus import build_gettext_corpus
from layermoe_core.data.corpus import CorpusSpec, load_documents, open_sequences
from layermoe_core.model.checkpoints import init_model, load_tokenizer
from layermoe_core.training.launch import BaseJob, LauncherSettings, launch
from layermoe_core.training.trainer import TrainSettings, train_causal_lm

from .common import STEP_CACHE
from .training import ProgressReporter


@task(name="build offline corpus", cache_policy=STEP_CACHE, persist_result=True, retries=2, retry_delay_seconds=10)
def build_corpus(output_dir: Path, languages: list[str], packages: list[str]) -> dict[str, CorpusSpec]:
    """Parallel gettext catalogs of named Debian packages -> one jsonl per language (see offline_corpus)."""
    corpus_dir = build_gettext_corpus(output_dir, languages, packages)
    return {lang: CorpusSpec(path=corpus_dir / f"{lang}.jsonl") for lang in languages}


@task(name="train tokenizer", cache_policy=STEP_CACHE, persist_result=True)
def train_tokenizer(corpora: dict[str, CorpusSpec], vocab_size: int, output_dir: Path) -> Path:
    texts = [text for lang in sorted(corpora) for text in load_documents(corpora[lang])["text"]]
    train_demo_tokenizer(texts, vocab_size, output_dir)
    return output_dir


@task(name="train base model", cache_policy=STEP_CACHE, persist_result=True)
def train_base(
    tokenizer_dir: Path, tokens_path: Path, size: str, seed: int, settings: TrainSettings, output_dir: Path,
    launcher: LauncherSettings | None = None,
) -> Path:
    """A small Qwen2 trained from scratch on the old languages: the demo's "pretrained" model."""
    tokenizer = load_tokenizer(tokenizer_dir)
    config = demo_base_config(len(tokenizer), size)
    if launcher is not None:
        job = BaseJob(tokenizer_dir=tokenizer_dir, base_config=config.to_dict(), seed=seed, tokens_path=tokens_path,
                      settings=settings, output_dir=output_dir)
        result = launch(job, launcher, ProgressReporter("base").fn)
        get_run_logger().info("base model trained (%s processes): %s", launcher.processes, result.final_metrics)
        return result.model_dir
    model = init_model(config, seed)
    result = train_causal_lm(model, open_sequences(tokens_path), settings, output_dir, [ProgressReporter("base")])
    get_run_logger().info("base model trained: %s", result.final_metrics)
    tokenizer.save_pretrained(result.model_dir)
    return result.model_dir
