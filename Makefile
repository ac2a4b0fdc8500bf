# One command each sets everything up on a fresh machine (Python 3.11 and pip are enough).
#   make demo   - the embedded-default demo (local Prefect, local sqlite MLflow, no servers)
#   make test   - lint (ruff check, ruff format), type check (mypy on layermoe_core/ and registry/), the docs site
#                 (mkdocs build --strict), then the test suite
# torch is installed first and pinned (a CPU wheel here); for a GPU build override it, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3.11
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false
export NO_MKDOCS_2_WARNING := 1

.PHONY: test demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mkdocs build --strict --site-dir build/site
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/layermoe demo

clean:
	rm -rf $(VENV) .demo build/site
