#!/usr/bin/env bash
# The prepared GPU check (`make gpu-check`; tests/README.md, "GPU check"): tests/test_gpu.py in-process over NCCL
# at world size 1, then the ~1.1B-parameter LoRA throughput benchmark (tests/benchmarks/bench_gpu_lora.py).
# Sized for under 9 minutes on one H200; installs nothing from the network. Without a CUDA GPU it prints
# "skipped: no CUDA GPU" and exits 0.
#
#   bash tests/gpu_check.sh          # from the repo root; PYTHON (default python3) must hold torch
#
# The wheels `make gpu-wheels` put in $GPU_WHEELS (.whl) are installed into $GPU_SITE (/tmp/site) and put
# first on PYTHONPATH, as /work/.library/device/README.md says; the repo root goes on it too (no install).
# Logs and the benchmark's JSON go to $OUT when it is set (the device tool brings that folder back), else to
# $GPU_CHECK_LOGS (/tmp/gpu-check). Exit status: 0 when both parts pass (or skip), else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
GPU_WHEELS=${GPU_WHEELS:-.whl}
GPU_SITE=${GPU_SITE:-/tmp/site}
LOGS=${OUT:-${GPU_CHECK_LOGS:-/tmp/gpu-check}}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-270}  # s; the two parts and the install fit 9 minutes with a margin
BENCH_TIMEOUT=${BENCH_TIMEOUT:-210}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "skipped: no CUDA GPU ($PYTHON: $("$PYTHON" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -1))"
    exit 0
fi
mkdir -p "$LOGS"
started=$SECONDS
if compgen -G "$GPU_WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$GPU_SITE" \
        "$GPU_WHEELS"/*.whl || { echo "FAILED: installing the wheels in $GPU_WHEELS"; exit 1; }
    export PYTHONPATH="$GPU_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no wheels in $GPU_WHEELS (make gpu-wheels on a machine with pip): using what $PYTHON has"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# tests/conftest.py sets DS_ACCELERATOR=cpu when it is unset: on a GPU it must say cuda before pytest starts.
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$PYTHON" -c 'import sys, torch, transformers, peft, deepspeed, pydantic
print("python", sys.version.split()[0], "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| peft", peft.__version__, "| deepspeed", deepspeed.__version__, "| pydantic", pydantic.__version__)' \
    || { echo "FAILED: the packages the check needs do not import"; exit 1; }

echo "== tests/test_gpu.py (pytest -m gpu; limit ${TESTS_TIMEOUT} s)"
timeout -k 10 "$TESTS_TIMEOUT" "$PYTHON" -m pytest tests/test_gpu.py -m gpu -p no:cacheprovider -q -rA \
    --junitxml "$LOGS/test_gpu.xml" 2>&1 | tee "$LOGS/test_gpu.log"
tests=${PIPESTATUS[0]}

echo "== tests/benchmarks/bench_gpu_lora.py (limit ${BENCH_TIMEOUT} s)"
timeout -k 10 "$BENCH_TIMEOUT" "$PYTHON" tests/benchmarks/bench_gpu_lora.py --out "$LOGS/bench_gpu_lora.json" \
    2>&1 | tee "$LOGS/bench_gpu_lora.log"
bench=${PIPESTATUS[0]}

echo "== gpu check: tests exit $tests, benchmark exit $bench (124: over its limit), $((SECONDS - started)) s in all"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
