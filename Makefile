# Two commands on a fresh machine: `make run` and `make test`. Everything else builds on them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# `make run` installs the gateway and what it needs to run, nothing else; `make test` adds the test and
# dev extras (pytest, the real SDKs, ruff, mypy).
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test lint bench soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $(TEST_STAMP) $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/bt-gateway serve -c config/gateway.yaml

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(TEST_STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy

bench: $(TEST_STAMP)
	@command -v nginx >/dev/null && command -v wrk >/dev/null || \
		(apt-get update -q && apt-get install -y -q nginx-light wrk)
	$(BIN)/python bench/run.py

# A bounded mixed load against the real gateway (127.0.0.1 only, at most 10 minutes): memory and open
# files must stay flat. Not part of `make test`. SOAK_SECONDS sets the length.
soak: $(TEST_STAMP)
	$(BIN)/python bench/soak.py --seconds $${SOAK_SECONDS:-120}

clean:
	rm -rf $(VENV) build *.egg-info
