# The image the Prefect workers run layermoe flows in (services `worker` and `gpu-worker` of
# docker-compose.yml). As in the Makefile, torch is installed first and pinned, from the wheel
# index that matches the hardware (CPU wheels by default; the GPU worker passes a CUDA index),
# so that installing the package afterwards keeps that torch instead of pulling another.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/data/huggingface

RUN pip install ${TORCH_SPEC} --index-url ${TORCH_INDEX_URL}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY layermoe_core ./layermoe_core
COPY demo ./demo
COPY registry ./registry
COPY tasks ./tasks
COPY flows ./flows
RUN pip install . \
    && useradd --create-home --uid 1000 layermoe \
    && mkdir -p /data \
    && chown layermoe:layermoe /data

# Checkpoints and caches go to /data, a volume in docker-compose.yml; the code stays read-only.
USER layermoe
CMD ["python", "-m", "flows.worker", "--pool", "layermoe", "--type", "process", "--with-healthcheck"]
