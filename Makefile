# The two commands a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv install serve sample test test-fast lint bench load clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build where a CPU one is enough.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

venv install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/sedd serve --host $(HOST) --port $(PORT)

sample: $(VENV)/.installed
	$(BIN)/sedd sample --num-samples 2 --show-intermediate

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -ra

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -ra -m "not slow and not browser"

lint: $(VENV)/.installed
	$(BIN)/ruff check sedd_core app tests

bench: $(VENV)/.installed
	$(BIN)/sedd bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The long load run of docs/reliability.md: 64 streaming clients for 3 minutes on loopback.
load: $(VENV)/.installed
	$(BIN)/python scripts/load_test.py --model default --clients 64 --duration 180
