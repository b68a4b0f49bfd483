# Two commands do all the set-up on a fresh machine (see README):
#   make bench   installs, then runs the main job (default benchmark on the bundled reference model -> report)
#   make test    installs, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser test bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch 2.13.0 is a local CPU wheel on our machines; any torch >= 2.4 works (GPU users: install theirs first)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# The report test renders the page in headless Chromium (Debian's package). `make test` installs it only on CI
# (CI=true); elsewhere run `make browser` once to enable that test, which otherwise skips with a one-line reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -q chromium >/dev/null; }; }; } || \
	  echo "note: chromium is not installed; the report-rendering test will be skipped"

test: setup
	@if [ "$${CI:-}" = "true" ]; then $(MAKE) --no-print-directory browser; fi
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
