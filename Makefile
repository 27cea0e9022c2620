# The two set-up commands (README): `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install when the project's dependency list changes.
STAMP := $(VENV)/.stamp-install
export TRITON_INTERPRET ?= 1

.PHONY: demo test bench lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/detkit demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) tools/bench.py $(BENCH)

lint: $(STAMP)
	$(VENV)/bin/ruff check detkit tests tools
	$(VENV)/bin/ruff format --check detkit tests tools

format: $(STAMP)
	$(VENV)/bin/ruff format detkit tests tools
	$(VENV)/bin/ruff check --fix detkit tests tools

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
