# LLM Camp: the two set-up commands are `make run` and `make test` (see README.md).
# Both create .venv/ if needed, install torch==2.13.0 first (so pip never pulls a CUDA build),
# then the package with the extras the job needs; both are idempotent.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" on a Linux laptop without a local CPU wheel
TORCH_PIP_ARGS ?=

.PHONY: run test install install-all browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install torch==2.13.0 $(TORCH_PIP_ARGS)
	touch $@

# what `camp run` needs: the core and the chain's extras (data, hf)
$(VENV)/.chain: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -e ".[chain]"
	touch $@

# everything: kernels, distributed, demos, dev tools
$(VENV)/.all: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -e ".[all]"
	touch $@ $(VENV)/.chain

install: $(VENV)/.chain
install-all: $(VENV)/.all

# headless Chromium for the demos' browser tests (Debian/Ubuntu as root); never a browser download.
# Fails when it cannot install one as root or in CI; a user without root gets a loud warning, and the
# browser tests then skip with that reason (see tests/conftest.py).
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || { echo "make browser: apt-get could not install chromium" >&2; exit 1; }; \
	  command -v chromium >/dev/null 2>&1 || { echo "make browser: chromium still missing after apt-get" >&2; exit 1; }; \
	elif [ "$$(id -u)" = 0 ] || [ -n "$$CI" ]; then \
	  echo "make browser: no chromium and no apt-get to install it: install chromium, then re-run" >&2; exit 1; \
	else \
	  echo "make browser: WARNING: no chromium and not root: the browser tests will be SKIPPED (install chromium to run them)" >&2; \
	fi

run: install
	$(BIN)/camp run

test: install-all browser
	CAMP_TIER=ci CAMP_PROGRESS=0 $(BIN)/python -m pytest tests -n 2 --dist loadgroup -q
