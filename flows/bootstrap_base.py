"""The `bootstrap-base` flow: train the demo's small multilingual base and register it as round 0."""

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from layermoe_core.data.corpus import CorpusSpec, combine_samples
from layermoe_core.training.launch import LauncherSettings
from layermoe_core.training.trainer import TrainSettings
from registry.settings import RegistrySettings
from tasks.analysis import TOKEN_STORE_DIR, Sampling, sample_tokens
from tasks.bootstrap import train_base, train_tokenizer
from tasks.parent import register_base_model

from .plan import TokenSettings


class BootstrapPlan(BaseModel):
    """The base is trained on `languages`; its tokenizer on every corpus (as a real multilingual base's is)."""

    model_config = ConfigDict(extra="forbid")

    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    corpora: dict[str, CorpusSpec]
    languages: list[str] = Field(min_length=1)
    vocab_size: int = Field(8000, ge=259)
    size: Literal["demo", "tiny"] = "demo"
    seed: int = 0
    train_tokens: int = Field(400_000, ge=1, description="per language")
    exposure_tokens: int = Field(
        0,
        ge=0,
        description="per corpus language outside `languages`: the base also trains on this "
        "many of its tokens, as a real multilingual base has seen a little of every language its "
        "tokenizer covers (their embeddings are trained); 0: none",
    )
    tokens: TokenSettings = Field(default_factory=TokenSettings)
    train: TrainSettings = Field(default_factory=lambda: TrainSettings(learning_rate=1e-3, num_epochs=1, warmup_ratio=0.05))
    alias: str = "champion"
    launcher: LauncherSettings | None = Field(None, description="train the base as an `accelerate launch` job; none: in-process")
    workdir: Path = Path(".layermoe/work")


@flow(name="bootstrap-base", log_prints=True)
def bootstrap_base(plan: BootstrapPlan) -> int:
    work = plan.workdir.resolve() / "base"
    tokenizer_dir = train_tokenizer(plan.corpora, vocab_size=plan.vocab_size, output_dir=work / "tokenizer")
    sampling = Sampling(
        corpora=plan.corpora,
        tokenizer_dir=tokenizer_dir,
        seq_len=plan.tokens.seq_len,
        seed=plan.seed,
        heldout_fraction=plan.tokens.heldout_fraction,
        store_dir=plan.workdir.resolve() / TOKEN_STORE_DIR,
        out_dir=work,
    )
    tokens = sample_tokens(sampling, "tokens", plan.languages, plan.train_tokens)
    exposed = [lang for lang in plan.corpora if lang not in plan.languages]
    if plan.exposure_tokens and exposed:
        exposure = sample_tokens(sampling, "exposure", exposed, plan.exposure_tokens)
        tokens = combine_samples([tokens, exposure], sampling.path("tokens-with-exposure"))
    model_dir = train_base(
        tokenizer_dir, tokens, size=plan.size, seed=plan.seed, settings=plan.train, output_dir=work / "train", launcher=plan.launcher
    )
    version = register_base_model(plan.registry, model_dir, plan.languages, plan.alias)
    get_run_logger().info("base registered as version %s with alias %s", version, plan.alias)
    return version
