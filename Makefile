# The README's two commands are `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYENV_FOR_SAM := 3.11.7:3.12.1:3.13.0

.PHONY: demo stack test lint typecheck template bench load build clean

# Everything for the tests (and the demo).
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(BIN)/.installed-local

# Only what the demo needs (moto, Pillow), so a first `make demo` installs less.
$(BIN)/.installed-local: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[local]'
	touch $@

demo: $(BIN)/.installed-local
	$(BIN)/python -m kontext_s3_tools.demo

stack: $(BIN)/.installed-local
	$(BIN)/python -m kontext_s3_tools.stack

test: $(BIN)/.installed lint typecheck template
	$(BIN)/pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/.installed
	$(BIN)/mypy

template: $(BIN)/.installed
	$(BIN)/cfn-lint template.yaml
	SAM_CLI_TELEMETRY=0 AWS_DEFAULT_REGION=us-east-1 $(BIN)/sam validate --lint

bench: $(BIN)/.installed
	$(BIN)/python -m benchmarks.run

load: $(BIN)/.installed-local
	$(BIN)/python -m kontext_s3_tools.load --uploads 500

# Needs python3.13 on PATH (pyenv here) and network access to PyPI for the arm64 wheels.
build: $(BIN)/.installed
	SAM_CLI_TELEMETRY=0 PYENV_VERSION=$(PYENV_FOR_SAM) $(BIN)/sam build

clean:
	rm -rf $(VENV) .aws-sam out .pytest_cache .mypy_cache .ruff_cache
