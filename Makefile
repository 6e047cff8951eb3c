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

# Every figure under docs/benchmarks/, redrawn from the committed CSVs alone (no benchmark runs).
SWEEP_CSVS := $(wildcard docs/benchmarks/sweeps/*/sweep.csv)
plots: $(STAMP)
	MPLBACKEND=Agg $(BIN)/python scripts/plot_ot.py --csv docs/benchmarks/ot/ot.csv
	MPLBACKEND=Agg $(BIN)/python scripts/plot_pool.py --csv docs/benchmarks/pool/pool.csv
	MPLBACKEND=Agg $(BIN)/python scripts/bench_generic.py --replot --out docs/benchmarks/generic
	$(if $(SWEEP_CSVS),MPLBACKEND=Agg $(BIN)/python scripts/plot_sweep.py --csv $(SWEEP_CSVS))

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis runs
