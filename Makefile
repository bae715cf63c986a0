# grainflow: `make demo` and `make test` work on a fresh clone; both create .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= out/demo

.PHONY: venv browser demo test test-all bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "grainflow needs Python 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# No `pip install --upgrade pip`: the venv's own pip installs this project. --no-compile:
	# Python writes the bytecode of what is actually imported on first import; compiling all
	# of torch, Ray and the rest up front took ~30 s of the install on 2 cores.
	$(PY) -m pip install --quiet --no-compile -e '.[test,bench]'
	touch $(STAMP)

venv: $(STAMP)

# Synthesise archives, train the tiny models (first run only), reprocess, write the report.
demo: $(STAMP)
	$(PY) -m jobs.demo --dir $(DEMO_DIR)

# The viewer's browser test drives Debian's chromium; Playwright never downloads one.
browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium; }; }

test: $(STAMP) browser
	$(PY) -m pytest

test-all: $(STAMP) browser
	$(PY) -m pytest -m ''

bench: $(STAMP)
	$(PY) benchmarks/stores.py

clean:
	rm -rf $(VENV) out .pytest_cache
