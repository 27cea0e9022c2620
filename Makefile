# The two set-up commands (README): `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install when the project's dependency list changes.
STAMP := $(VENV)/.stamp-install
export TRITON_INTERPRET ?= 1

.PHONY: demo test bench lint format clean

# --no-compile: byte-compiling every installed module (torch's thousands) was half of the
# install's CPU time (64 of 128 s on 2 cores); Python compiles what it imports when it does.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -e '.[dev]'
	touch $(STAMP)

# The main job: build the digits data, train SSD on it, evaluate the best checkpoint on the
# val split (inside `train`), and draw predictions for a few val images.
DEMO_RUN := runs/demo
DETKIT_CACHE ?= $(HOME)/.cache/detkit
export DETKIT_CACHE

demo: $(STAMP)
	$(VENV)/bin/detkit data digits out=$(DETKIT_CACHE)/digits
	$(VENV)/bin/detkit train experiment=digits_ssd hydra.run.dir=$(DEMO_RUN)
	$(VENV)/bin/detkit predict ckpt=$(DEMO_RUN)/checkpoints/best.ckpt \
		source=$(DETKIT_CACHE)/digits/val max_images=8 hydra.run.dir=$(DEMO_RUN)/predict
	@echo
	@echo "demo done:"
	@echo "  run (config, logs, summary.json)  $(DEMO_RUN)"
	@echo "  checkpoints                       $(DEMO_RUN)/checkpoints"
	@echo "  evaluation (metrics.json, plots)  $(DEMO_RUN)/eval"
	@echo "  predictions drawn                 $(DEMO_RUN)/predict"

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
