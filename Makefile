# Entry points for a fresh Debian 12 machine. Every target is safe to run twice.
#   make demo   set up, then run the main job on the simulator
#   make test   set up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench lint lab clean

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
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.codec --json bench/results/codec.json

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info

lab: $(STAMP)
	./lab/run
