# Entry points for a fresh Debian 12 machine. Every target is safe to run twice.
#   make demo   set up, then run the main job on the simulator
#   make test   set up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The sans-IO modules, type-checked with --strict (the rest of the tree at
# mypy's default level, [tool.mypy] in pyproject.toml).
STRICT := xenbind/stream xenbind/compress xenbind/session.py xenbind/types.py xenbind/errors.py \
          xenbind/diskstream.py xenbind/blockhash.py xenbind/wirecomp.py remusd/wire.py daemonkit/metrics.py \
          receiver/core.py receiver/policy.py receiver/diskbuffer.py \
          remusd/core.py remusd/policy.py remusd/stats.py remusd/pacer.py

.PHONY: setup demo test typecheck bench lint lab clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@if [ "$$(id -u)" = 0 ]; then ./scripts/install-system-deps; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/python -m remusd.demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) --no-print-directory typecheck
	$(BIN)/python -m pytest -q

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy --strict --follow-imports=silent $(STRICT)

bench: $(STAMP)
	$(BIN)/python -m bench.codec --json bench/results/codec.json

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info

lab: $(STAMP)
	./lab/run
