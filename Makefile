# trecflow: `make demo` runs the main job, `make test` the tests, `make bench` the benchmarks.
# Each target creates or refreshes .venv first; that is skipped when nothing it depends on changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

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
	$(BIN)/trecflow run configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10

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
