"""Convert a checkpoint saved with one widened router per layer (layermoe before the routing tree).

Such a block had one `gate` over all its experts, widened each round, and only the newest
round's classifier. The conversion keeps its function exactly: the newest round's router is
the old gate with the old classifier; each earlier round's router is the old gate's first rows
(the experts that existed then), without a classifier, which is what the old code computed for
an old-routed token (probabilities masked to the pre-round experts and renormalised).
Earlier rounds' classifiers had been dropped by that code, so their layers are cleared in the
config and listed under `legacy_dropped_classifier_layers`.

    python -m layermoe_core.legacy SOURCE_DIR TARGET_DIR
"""

import argparse
import json
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from .errors import LayerMoEError
from .model.configuration_layermoe import ROUTING_FORMAT

_OLD_KEY = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.mlp)\.(?P<part>gate\.weight|classifier\.weight|classifier\.bias)$")


def convert_legacy_checkpoint(source: str | Path, target: str | Path) -> Path:
    source, target = Path(source), Path(target)
    config = json.loads((source / "config.json").read_text())
    if config.get("model_type") != "layermoe":
        raise LayerMoEError(f"{source} is not a LayerMoE checkpoint (model_type {config.get('model_type')!r}); nothing to convert")
    if config.get("routing_format") == ROUTING_FORMAT:
        raise LayerMoEError(f"{source} already has routing_format {ROUTING_FORMAT}; it loads as it is")
    weight_files = sorted(source.glob("*.safetensors"))
    if len(weight_files) != 1:
        raise LayerMoEError(f"{source} has {len(weight_files)} safetensors files; the converter handles one unsharded file")
    rounds = config["expansion_rounds"]
    tensors = load_file(weight_files[0])
    converted = {}
    for name, tensor in tensors.items():
        match = _OLD_KEY.match(name)
        if match is None:
            converted[name] = tensor
            continue
        layer, prefix = int(match["layer"]), match["prefix"]
        sizes = [1] + [r["allocation"][layer] for r in rounds]
        router_sizes = [sum(sizes[: i + 1]) for i in range(1, len(sizes)) if sizes[i]]  # experts after each such round
        newest = len(router_sizes) - 1
        if match["part"] == "gate.weight":
            for index, num_experts in enumerate(router_sizes):
                converted[f"{prefix}.routers.{index}.gate.weight"] = tensor[:num_experts].clone()
        else:
            converted[f"{prefix}.routers.{newest}.{match['part']}"] = tensor
    dropped = {str(i): r.get("classifier_layers", []) for i, r in enumerate(rounds[:-1]) if r.get("classifier_layers")}
    for expansion in rounds[:-1]:
        expansion["classifier_layers"] = []
    config["routing_format"] = ROUTING_FORMAT
    if dropped:
        config["legacy_dropped_classifier_layers"] = dropped
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy2(path, target / path.name)
    save_file(converted, target / weight_files[0].name, metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    print(f"converted: {convert_legacy_checkpoint(args.source, args.target)}")


if __name__ == "__main__":
    main()
