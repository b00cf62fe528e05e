#!/usr/bin/env bash
# GPU checks for a CUDA host (e.g. a lent H100/H200): the GPU tests, and optionally the GPU benchmarks.
#
#   scripts/gpu-check.sh [tests|bench|all]      (default: tests)
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
