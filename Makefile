# trecflow: `make demo` runs the main job, `make test` the tests, `make bench` the benchmarks.
# Each target creates or refreshes .venv first; that is skipped when nothing it depends on changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: venv demo test test-fast bench lock clean

venv: $(STAMP)

# pip (not uv): it takes the CPU torch wheel from the machine's disk (see requirements.lock).
$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade 'pip==26.3'
	$(BIN)/python -m pip install --quiet --constraint requirements.lock --editable '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/trecflow corpus demo
	$(BIN)/trecflow compare configs/demo.yaml

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -q --durations=30

# The browser test (tests/flows/test_ui.py) drives Debian's chromium with Playwright (the `test` extra);
# Playwright never downloads a browser here. Installed once; `apt-get update` only if that fails.
$(CHROMIUM):
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium \
	  || { $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m bench

# Re-pin the whole working set after changing pyproject.toml's dependencies.
lock: $(STAMP)
	{ echo "# Every package of the verified working set (pip freeze of .venv; refresh with make lock)."; \
	  echo "# Used as pip constraints by the Makefile and the image: a fresh machine installs exactly this set."; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) .trecflow
