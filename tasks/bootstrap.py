"""Tasks that make the demo's base model: corpus, tokenizer, trained dense base."""

from pathlib import Path

from prefect import get_run_logger

from demo.base import demo_base_config, train_demo_tokenizer
from demo.offline_corpus import build_gettext_corpus
from layermoe_core.data.corpus import CorpusSpec, load_documents
from layermoe_core.model.checkpoints import load_tokenizer
from layermoe_core.training.launch import BaseJob, LauncherSettings
from layermoe_core.training.trainer import FINAL_DIR_NAME, TrainSettings

from .common import file_step
from .training import run_jobs


@file_step(lambda a: a["output_dir"], name="build offline corpus", retries=2, retry_delay_seconds=10)
def build_corpus(output_dir: Path, languages: list[str], packages: list[str]) -> dict[str, CorpusSpec]:
    """Parallel gettext catalogs of named Debian packages -> one jsonl per language (see offline_corpus)."""
    corpus_dir = build_gettext_corpus(output_dir, languages, packages)
    return {lang: CorpusSpec(path=corpus_dir / f"{lang}.jsonl") for lang in languages}


@file_step(lambda a: a["output_dir"], name="train tokenizer")
def train_tokenizer(corpora: dict[str, CorpusSpec], *, vocab_size: int, output_dir: Path) -> Path:
    texts = [text for lang in sorted(corpora) for text in load_documents(corpora[lang])["text"]]
    train_demo_tokenizer(texts, vocab_size, output_dir)
    return output_dir


@file_step(lambda a: a["output_dir"] / FINAL_DIR_NAME, name="train base model")
def train_base(
    tokenizer_dir: Path,
    tokens_path: Path,
    *,
    size: str,
    seed: int,
    settings: TrainSettings,
    output_dir: Path,
    launcher: LauncherSettings | None = None,
) -> Path:
    """A small Qwen2 trained from scratch on the old languages: the demo's "pretrained" model."""
    job = BaseJob(
        tokenizer_dir=tokenizer_dir,
        base_config=demo_base_config(len(load_tokenizer(tokenizer_dir)), size).to_dict(),
        seed=seed,
        tokens_path=tokens_path,
        settings=settings,
        output_dir=output_dir,
    )
    (result,) = run_jobs([job], launcher)
    get_run_logger().info("base model trained: %s", result.final_metrics)
    return result.model_dir
