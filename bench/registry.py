"""Delta versions against whole copies: registry bytes, register and download time on a 4-round lifelong chain.

Run from the repository root: `python -m bench.registry [--hidden 512] [--repeats 3]`. Offline, in
a temporary folder: a Qwen2-style base (hidden `--hidden`, 4 layers, vocab 16k, fp32) and four
rounds, each expanding the previous child as a lifelong round does (new experts per layer, a
router, one classifier; the trained parameters perturbed in place of training). The same chain
is registered twice, on two local sqlite stores: delta storage (the default) and whole copies
(`delta_storage=False`). Then the newest version is downloaded with an empty cache (delta: the
whole lineage is fetched and the model rebuilt) and a warm one, interleaved `--repeats` times
with a `shutil.copytree` of the same folder.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from layermoe_core.environment import use_local_stack

_WORKDIR = tempfile.mkdtemp(prefix="layermoe-registry-bench-")
atexit.register(shutil.rmtree, _WORKDIR, ignore_errors=True)
use_local_stack(os.path.join(_WORKDIR, "prefect"))

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from layermoe_core import expand, insert_classifiers  # noqa: E402
from registry import RegistrySettings, RoundInfo, download_version, list_versions, register_base, register_child  # noqa: E402
from registry.manifest import sha256_file  # noqa: E402

ROUNDS = [
    (["en"], ["el"], [1, 2, 2, 1]),
    (["en", "el"], ["hu"], [2, 1, 1, 2]),
    (["en", "el", "hu"], ["tr"], [1, 1, 2, 2]),
    (["en", "el", "hu", "tr"], ["bn"], [2, 2, 1, 1]),
]


def build_chain(root: Path, hidden: int) -> list[Path]:
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=16_000,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).eval()
    folders = [root / "v1"]
    model.save_pretrained(folders[0])
    for number, (old, new, allocation) in enumerate(ROUNDS, start=1):
        model = expand(model, allocation, old, new)
        insert_classifiers(model, [0])
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.02 * torch.randn_like(param))
        folders.append(root / f"v{number + 1}")
        model.save_pretrained(folders[-1])
    return folders


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def register_chain(settings: RegistrySettings, folders: list[Path]) -> list[float]:
    seconds = []
    start = time.perf_counter()
    register_base(settings, folders[0], ["en"])
    seconds.append(time.perf_counter() - start)
    for number, (old, new, allocation) in enumerate(ROUNDS, start=1):
        info = RoundInfo(round=number, old_languages=old, new_languages=new, allocation=allocation, classifier_layers=[0])
        start = time.perf_counter()
        register_child(settings, folders[number], number, info, {}, {}, {}, {})
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(_WORKDIR)
    folders = build_chain(root / "models", args.hidden)
    stores = {
        kind: RegistrySettings(
            tracking_uri=f"sqlite:///{root}/{kind}/mlflow.db", cache_dir=root / kind / "cache", delta_storage=kind == "delta"
        )
        for kind in ("delta", "whole")
    }
    register_s = {kind: register_chain(settings, folders) for kind, settings in stores.items()}

    print(f"model folders (MB): {', '.join(f'v{i + 1} {folder_bytes(f) / 1e6:.1f}' for i, f in enumerate(folders))}")
    for kind, settings in stores.items():
        stored = list_versions(settings)["stored_bytes"].astype(int).tolist()
        artifacts = folder_bytes(root / kind / "artifacts")
        print(
            f"{kind:5s}: stored per version (MB) {[round(b / 1e6, 1) for b in stored]}, total {sum(stored) / 1e6:.1f} MB "
            f"(artifact store on disk {artifacts / 1e6:.1f} MB); register s per version {[round(s, 2) for s in register_s[kind]]}"
        )

    newest = folders[-1]
    times: dict[str, list[float]] = {"copytree": [], "delta cold": [], "delta warm": [], "whole cold": [], "whole warm": []}
    for repeat in range(args.repeats):
        start = time.perf_counter()
        shutil.copytree(newest, root / f"copy-{repeat}")
        times["copytree"].append(time.perf_counter() - start)
        for kind, settings in stores.items():
            shutil.rmtree(settings.cache_dir, ignore_errors=True)
            for temperature in ("cold", "warm"):
                dest = root / f"{kind}-{temperature}-{repeat}"
                start = time.perf_counter()
                local = download_version(settings, len(folders), dest)
                times[f"{kind} {temperature}"].append(time.perf_counter() - start)
                assert sha256_file(local.path / "model.safetensors") == sha256_file(newest / "model.safetensors")
                shutil.rmtree(dest)
        shutil.rmtree(root / f"copy-{repeat}")
    copy = statistics.median(times["copytree"])
    print(f"download of v{len(folders)} ({folder_bytes(newest) / 1e6:.1f} MB), median of {args.repeats}:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:10s} {median:6.2f} s  ({median / copy:5.1f}x copytree)")


if __name__ == "__main__":
    main()
