# tomectl: `make demo` sets up .venv and compresses DeiT-Tiny with ToMe; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SHARED ?= $(abspath ../shared)
WEIGHTS_DIR := $(SHARED)/weights
# Real weights when ../shared is beside the checkout; otherwise the demo says so and uses random ones.
WEIGHTS_FLAG := $(if $(wildcard $(WEIGHTS_DIR)/deit_tiny_patch16_224.safetensors),,--random-weights)
DEMO_OUT ?= runs/demo_deit_tiny_tome_r13

.PHONY: install demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	@test -z "$(WEIGHTS_FLAG)" || echo "note: $(WEIGHTS_DIR) not found: demo runs with random weights"
	TOMECTL_WEIGHTS_DIR=$(WEIGHTS_DIR) $(BIN)/tomectl compress deit_tiny_patch16_224 --method tome --r 13 \
		--out $(DEMO_OUT) --force $(WEIGHTS_FLAG)

# one pytest-xdist worker per core (each computes on one thread; traces are shared through a folder);
# worksteal: an idle worker takes queued tests from a busy one (the heavy exports end unevenly)
TEST_WORKERS ?= auto
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: install
	$(BIN)/ruff check tomectl tests benchmarks

bench: install
	$(BIN)/python benchmarks/tome_accuracy.py

clean:
	rm -rf runs out .pytest_cache
