# Two commands do all the set-up on a fresh machine (each creates .venv and installs what is missing):
#   make demo   run the main job (the training pipeline on the synthetic default, ZenML's embedded default stack)
#   make test   run the tests (what CI runs; it adds the `kubernetes` extra to the venv, see below)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.laser-installed
TEST_STAMP := $(VENV)/.laser-test-installed
PYTEST_ARGS ?= -m "not slow"

export ZENML_ANALYTICS_OPT_IN := false
export GX_ANALYTICS_ENABLED := false
export ORT_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-all lint format install clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[dev]"
	@touch $(STAMP)

# The tests also need the `kubernetes` extra (the client plus six small packages, pinned by its lock file =
# requirements.lock + those): ZenML validates a Kubeflow orchestrator's configuration with the kubernetes client,
# and compiles a pipeline on a Kubernetes stack with it (tests/test_infra.py). The `kubeflow` extra cannot join:
# kfp needs protobuf<7, requirements.lock has 7, so the Kubeflow compile test skips here. The `ann` extra (hnswlib,
# the optional ANN index; tests/test_ann.py skips without it) is a source distribution: pip compiles it with g++.
$(TEST_STAMP): $(STAMP) infra/kubernetes/requirements-kubernetes.lock
	$(BIN)/python -m pip install --quiet -c infra/kubernetes/requirements-kubernetes.lock -e ".[dev,kubernetes,ann]"
	@touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/laser models fetch smollm2-135m-instruct
	$(BIN)/laser run --config configs/demo.yaml

test: $(TEST_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(TEST_STAMP)
	$(BIN)/python -m pytest

# ruff's lint rules and its formatter's check (pyproject.toml [tool.ruff]); `make format` rewrites the files
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .

# The peer benchmarks' own venv, bench/peers/.venv (RecTools 0.19, pinned by bench/peers/requirements-rectools.lock;
# never a dependency of the package): bench/peers/README.md
.PHONY: peers-venv
peers-venv:
	bench/peers/setup.sh

clean:
	rm -rf $(VENV) .pytest_cache
