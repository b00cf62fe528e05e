#!/usr/bin/env bash
# GPU checks for a CUDA host (e.g. a lent H100/H200): the GPU tests, and optionally the GPU benchmarks.
#
#   scripts/gpu-check.sh [tests|bench|all|round2]      (default: tests)
#
# round2 (issue 17, ~10 min of an H100/H200): `jev4 bench fast-path` with round2_settings (eager bf16,
# bucketed compiled bf16 with CUDA graphs, jev4 FP8, torchao FP8 compiled; grid, end-to-end corpus rows,
# FP8 nDCG@10 delta, targets) into $RESULTS/fast-path-round2/, then the GPU tests of the compiled and
# torchao paths. Carry torchao's wheel in $WHEELS (torchao-0.18.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl,
# 3.4 MB, no dependencies). ROUND2_SCOPE=network compiles the whole network per bucket instead of each layer
# (slower to compile). ROUND2_DRY=1 runs the same code on the CPU tiny model (aot_eager), to check the script.
#
# The host's own Python is used. Packages it lacks (onnxruntime-gpu above all) are installed from
# wheels in $WHEELS (default .whl/) into $JEV4_SITE, which goes first on PYTHONPATH; nothing is
# downloaded. Put bitsandbytes' wheel (43 MB) there too for the bnb GPU tests (they skip without it).
# Benchmark JSON and the GPU tests' JUnit XML (gpu-tests.xml) go to $RESULTS (default gpu-results/).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-tests}
WHEELS=${WHEELS:-.whl}
SITE=${JEV4_SITE:-/tmp/jev4-site}
RESULTS=${RESULTS:-gpu-results}
PY=${PYTHON:-python3}

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" - <<'PY'
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.cuda.is_available()}",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, ort.get_available_providers())
except ImportError:
    print("onnxruntime: not installed")
try:
    import torchao
    print("torchao", torchao.__version__)
except ImportError:
    print("torchao: not installed (carry its wheel in $WHEELS for the torch-fp8-torchao mode)")
PY

if [[ $mode == tests || $mode == all ]]; then
  # The JUnit XML keeps what tests record with record_property (parity cosines, the FP8 nDCG@10 delta);
  # xunit1, because pytest warns that record_property does not fit its default xunit2 schema.
  mkdir -p "$RESULTS"
  "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider -o junit_family=xunit1 --junitxml "$RESULTS/gpu-tests.xml" tests
fi
if [[ $mode == bench || $mode == all ]]; then
  mkdir -p "$RESULTS"
  "$PY" -m jev4.cli.main bench encode --results "$RESULTS/encode.json"
  "$PY" -m jev4.cli.main bench ort --results "$RESULTS/ort.json"
  # torch FP8 vs bf16 vs fp16 ORT + the end-to-end corpus comparison (needs onnxruntime-gpu for ort-fp16;
  # to split it over several calls, pass e.g. FAST_PATH_ARGS="--modes torch-bf16,torch-fp8 --corpus-docs 0").
  "$PY" -m jev4.cli.main bench fast-path --out "$RESULTS/fast-path" --force ${FAST_PATH_ARGS:-}
fi
if [[ $mode == round2 ]]; then
  mkdir -p "$RESULTS"
  "$PY" - "$RESULTS/fast-path-round2" "${ROUND2_SCOPE:-layers}" "${ROUND2_DRY:-0}" <<'PY'
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
from jev4.bench.gpu_fast_path import markdown, round2_settings, run_fast_path
out, scope, dry = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
tiny = dict(device="cpu", tiny=True, compile_backend="aot_eager", warmup=1, iters=2, corpus_docs=20, corpus_max_length=64,
            corpus_batch=4, e2e_length_buckets=(32, 64), ndcg_queries=10, ndcg_docs=40)
results = run_fast_path(round2_settings(scope=scope, **(tiny if dry else {})), out, force=True)
print(markdown(results))
PY
  if [[ ${ROUND2_DRY:-0} != 1 ]]; then
    "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider -o junit_family=xunit1 --junitxml "$RESULTS/gpu-tests-round2.xml" tests/runtime/test_torch_compiled.py
  fi
fi
