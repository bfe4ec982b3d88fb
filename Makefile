# The two commands a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv install system-tools serve sample test test-fast images lint bench load clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# The runtime: what `sedd serve` and the other commands need, no test tools.
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build where a CPU one is enough.
$(VENV)/.runtime: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -e .
	touch $@

# The test and lint tools (the dev extra) on top of the runtime.
$(VENV)/.dev: $(VENV)/.runtime
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

venv install: $(VENV)/.dev

# Debian packages some tests drive for real: headless Chromium (the web page) and nginx (the scale-out
# proxy). As CI installs them: on Debian as root when missing; elsewhere a note, and those tests skip
# with a reason.
system-tools:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	{ command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "make: missing$$missing (Debian: apt-get install$$missing as root); the tests that need them will skip"; \
	  fi; \
	fi

# `sedd serve` sets its OpenMP wait policy itself unless one is set (app/openmp.py: GOMP_SPINCOUNT=1000).
# SEDD_COMPILE=auto: on a CPU with a C++ compiler the network runs as one torch.compile'd graph, the fast
# path (docs/benchmarks.md, "CPU, round three"); the server compiles for a minute or so before /health
# answers 200. `SEDD_COMPILE=0 make serve` starts in seconds and runs eagerly.
serve: $(VENV)/.runtime
	SEDD_COMPILE=$${SEDD_COMPILE-auto} $(BIN)/sedd serve --host $(HOST) --port $(PORT)

sample: $(VENV)/.runtime
	$(BIN)/sedd sample --num-samples 2 --show-intermediate

# The whole suite, the container images included (--images: podman builds and runs them; see `images`).
test: $(VENV)/.dev system-tools
	PYTHON=$(BIN)/python $(BIN)/python -m pytest -q -ra --images

test-fast: $(VENV)/.dev
	$(BIN)/python -m pytest -q -ra -m "not slow and not browser"

# The container images built and run for real (docs/deployment.md, "Verifying the images"):
# scripts/verify_images.sh builds both with podman under build/images (on Debian as root it installs
# podman and its helpers), tests/test_images.py runs them, alone and through `docker compose`. `make test`
# runs them too (--images): about 7-15 minutes on a clean machine, 2 when build/images holds the last build.
images: $(VENV)/.dev
	PYTHON=$(BIN)/python $(BIN)/python -m pytest -q -ra -rP -m images tests/test_images.py

lint: $(VENV)/.dev
	$(BIN)/ruff check sedd_core sedd_cli app benchmarks tests

bench: $(VENV)/.runtime
	$(BIN)/sedd bench

clean:
	[ ! -f build/images/containers.conf ] || scripts/verify_images.sh clean
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The long load run of docs/reliability.md: 64 streaming clients for 3 minutes on loopback.
load: $(VENV)/.runtime
	$(BIN)/python scripts/load_test.py --model default --clients 64 --duration 180
