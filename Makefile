# Two commands for a fresh machine: `make run` and `make test`
# (`make lint` formats the tree and applies ruff's fixes; `make test-fast`, before
# each commit: the lint and format checks and every test not marked `slow`).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/default

.PHONY: run test test-fast lint install install-dev clean

$(BIN)/.runtime: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(BIN)/.dev: $(BIN)/.runtime requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

install: $(BIN)/.runtime
install-dev: $(BIN)/.dev

run: $(BIN)/.runtime
	bash launch/local.sh --workdir=$(WORKDIR)

test: $(BIN)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25 tests

test-fast: $(BIN)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

lint: $(BIN)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs
