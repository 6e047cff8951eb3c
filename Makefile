# Every target bootstraps .venv when it is missing or older than pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test test-fast bench sweep plots lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python train.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

bench: $(STAMP)
	$(BIN)/python scripts/bench_ot.py $(ARGS)
	$(BIN)/python scripts/bench_pool.py $(ARGS)

# One task trained once per backward mode (and pool), the budget in configs/sweep_$(TASK).yaml:
# make sweep TASK=classification|matching [ARGS="--modes implicit unroll key=value ..."]
TASK ?= classification
sweep: $(STAMP)
	$(BIN)/python scripts/sweep.py --task $(TASK) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis runs
