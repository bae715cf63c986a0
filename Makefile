# grainflow: `make demo` and `make test` work on a fresh clone; both create .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= out/demo
# Test processes: each runs whole test packages (tests/conftest.py's scheduler); one per
# core here. TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder
# A bound on `make test` (seconds; the suite takes ~15 min here). pytest-timeout stops a
# hung test, not pytest-xdist itself, which was seen to wait forever after replacing a
# crashed worker: CI would hold the run to its own limit. SIGINT goes to pytest and its
# workers, which print what ran and tear down their fixtures (Ray, the S3 server).
TEST_TIME_LIMIT_S ?= 2400

.PHONY: venv browser demo test test-all bench clean

# The venv's own pip installs the project (no `pip install --upgrade pip`, a download and
# ~7 s). Bytecode is compiled at install (pip's default), not left to first import: where
# PYTHONDONTWRITEBYTECODE is set, as on this machine, every test process and Ray worker
# would compile torch and Ray again.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "grainflow needs Python 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test,bench]'
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
	timeout --signal=INT --kill-after=60 $(TEST_TIME_LIMIT_S) $(PY) -m pytest $(PYTEST_PARALLEL) || \
	  { rc=$$?; [ $$rc -ne 124 ] || echo "make test: stopped after $(TEST_TIME_LIMIT_S) s (TEST_TIME_LIMIT_S)" >&2; \
	    exit $$rc; }

test-all: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_PARALLEL) -m ''

bench: $(STAMP)
	$(PY) benchmarks/stores.py

clean:
	rm -rf $(VENV) out .pytest_cache
