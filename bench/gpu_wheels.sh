#!/usr/bin/env bash
# Fetch into .whl/ the wheels that bench/gpu.sh installs on the device machine: the packages that
# bench.moe_layer, bench.generate, bench.rounds and bench.train_step import (with layermoe_core and
# registry) and the device image lacks or holds at too old a version, each pinned to the version in
# the project's venv (`pip freeze`). The device has no network; this runs here, where PyPI answers.
#
#   bash bench/gpu_wheels.sh [python version] [folder]    defaults: 3.12 (the device's python3), .whl
#   VENV=/path/to/.venv bash bench/gpu_wheels.sh          the venv whose versions are pinned (default .venv)
#
# .whl/ is git-ignored; it travels to the device as the run call's `carry`.
set -euo pipefail

PYTHON_VERSION=${1:-3.12}
DEST=${2:-.whl}
VENV=${VENV:-.venv}

# Why each is carried, against the device image's list of Python packages (its versions where the list gives them).
PACKAGES=(
  # layermoe_core needs transformers >= 5.25 (the image has 5.17), and transformers 5.25 needs
  # huggingface_hub 2.x with its HTTP client (the image has 1.x on httpx) and kernels (from_pretrained).
  transformers huggingface_hub httpx2 httpcore2 truststore kernels
  # configs and registry settings: pydantic is not in the image (typing_extensions: at pydantic's minimum).
  pydantic pydantic_core annotated-types typing-inspection typing_extensions
  # registry/: MLflow's client and its sqlite store, without the MLflow server (mlflow-skinny); mlflow's
  # import reaches fastapi and databricks, its sqlite store cryptography. protobuf: the version its
  # generated code was built against.
  mlflow-skinny databricks-sdk fastapi starlette sqlalchemy alembic mako cryptography cffi sqlparse cachetools
  protobuf importlib_metadata opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
  # registry.register imports layermoe_core.data, which imports datasets.
  datasets dill multiprocess
)

freeze=$("$VENV/bin/python" -m pip freeze)
pins=()
for name in "${PACKAGES[@]}"; do
  key=$(echo "$name" | tr 'A-Z_' 'a-z-')
  pin=$(echo "$freeze" | awk -F'==' -v key="$key" '{k = tolower($1); gsub("_", "-", k)} k == key {print $1 "==" $2}')
  if [ -z "$pin" ]; then
    echo "gpu_wheels: error: $name is not installed in $VENV; install the project there first (make install) or set VENV" >&2
    exit 1
  fi
  pins+=("$pin")
done

mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${pins[@]}"

# One version of each: two stop the whole install on the device.
duplicates=$(for wheel in "$DEST"/*.whl; do basename "$wheel" | cut -d- -f1 | tr 'A-Z_' 'a-z-'; done | sort | uniq -d)
if [ -n "$duplicates" ]; then
  echo "gpu_wheels: error: more than one wheel of: $duplicates; empty $DEST and run again" >&2
  exit 1
fi
echo "gpu_wheels: ${#pins[@]} wheels in $DEST, $(du -sh "$DEST" | cut -f1) (the device call carries up to 64 MiB with the tracked tree)"
