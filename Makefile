# Two commands on a fresh machine: `make run` and `make test`. Everything else builds on them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# `make run` installs the gateway and what it needs to run, nothing else; `make test` adds the test and
# dev extras (pytest, the real SDKs, ruff, mypy).
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
# The TypeScript SDK (npm `braintrust`, pinned in tests/js/package-lock.json) for tests/integration/test_js_sdk.py;
# reinstalled only when the lock file changes. No node/npm: the Python suite still runs and that test skips
# (or fails under CI=true).
JS_DIR := tests/js
JS_STAMP := $(JS_DIR)/node_modules/.installed
HAVE_NODE := $(shell command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 && echo yes)
JS_DEPS := $(if $(HAVE_NODE),$(JS_STAMP),no-node)

# `make image`: the container image, with docker when its engine runs, else podman (docker image format,
# which keeps the HEALTHCHECK). IMAGE names it; PYTHON_IMAGE replaces the Dockerfile's base image.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' gateway/__init__.py)
IMAGE ?= bt-gateway:$(VERSION)
ENGINE ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)
IMAGE_FLAGS = $(if $(filter podman,$(ENGINE)),--format docker) $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE))
# `make lock`: pins with hashes from PyPI alone (no local pip config); PIP_CERT for a TLS-inspecting proxy.
LOCK_ENV := PIP_CONFIG_FILE=/dev/null $(if $(PIP_CERT),PIP_CERT=$(PIP_CERT),$(if $(wildcard /etc/ssl/certs/ca-certificates.crt),PIP_CERT=/etc/ssl/certs/ca-certificates.crt))
LOCK_FLAGS := --quiet --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links

.PHONY: run test test-aiohttp-lowest docs-screenshot lint bench soak clean no-node image lock try

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $(TEST_STAMP) $(RUN_STAMP)

$(JS_STAMP): $(JS_DIR)/package-lock.json $(JS_DIR)/package.json
	cd $(JS_DIR) && npm ci --ignore-scripts --no-audit --no-fund
	touch $(JS_STAMP)

no-node:
	@echo "node/npm not found: skipping the JS SDK install; tests/integration/test_js_sdk.py will skip"

run: $(RUN_STAMP)
	$(BIN)/bt-gateway serve -c config/gateway.yaml

test: $(TEST_STAMP) $(JS_DEPS)
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The suite again on the lowest aiohttp the pin in pyproject.toml allows (a fresh `make test` installs the
# newest), in a venv of its own; nothing to do when both are one version. CI runs both.
AIOHTTP_LOWEST := $(shell sed -n 's/.*"aiohttp>=\([0-9.]*\),.*/\1/p' pyproject.toml)
LOWEST_VENV := .venv-aiohttp-lowest
test-aiohttp-lowest: $(TEST_STAMP) $(JS_DEPS)
	@newest=$$($(BIN)/python -c 'import aiohttp; print(aiohttp.__version__)'); \
	if [ "$$newest" = "$(AIOHTTP_LOWEST)" ]; then \
		echo "aiohttp $$newest is both the lowest and the newest the pin allows: make test covered both"; \
	else \
		set -e; test -x $(LOWEST_VENV)/bin/python || $(PYTHON) -m venv $(LOWEST_VENV); \
		$(LOWEST_VENV)/bin/pip install --quiet -e '.[test,dev]' 'aiohttp==$(AIOHTTP_LOWEST)'; \
		$(LOWEST_VENV)/bin/python -m pytest -q -p no:cacheprovider; \
	fi

# docs/status.png, the README's picture of the status page: taken by the browser test, kept only when it passes.
docs-screenshot: $(TEST_STAMP)
	UPDATE_DOCS_SCREENSHOT=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/integration/test_status_page.py

lint: $(TEST_STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy

bench: $(TEST_STAMP)
	@command -v nginx >/dev/null && command -v wrk >/dev/null && command -v redis-server >/dev/null && \
		command -v redis-cli >/dev/null && command -v curl >/dev/null && command -v valgrind >/dev/null || \
		(apt-get update -q && apt-get install -y -q nginx-light wrk redis-server curl valgrind)
	$(BIN)/python bench/run.py

image:
	$(ENGINE) build $(IMAGE_FLAGS) -t $(IMAGE) .

lock: $(TEST_STAMP)
	$(LOCK_ENV) $(BIN)/pip-compile $(LOCK_FLAGS) -o requirements.lock pyproject.toml
	$(LOCK_ENV) $(BIN)/pip-compile $(LOCK_FLAGS) --only-build-deps --build-deps-for wheel \
		-o requirements-build.lock pyproject.toml

# A bounded mixed load against the real gateway (127.0.0.1 only, at most 10 minutes): memory and open
# files must stay flat. Not part of `make test`. SOAK_SECONDS sets the length.
soak: $(TEST_STAMP)
	$(BIN)/python bench/soak.py --seconds $${SOAK_SECONDS:-120}

clean:
	rm -rf $(VENV) $(LOWEST_VENV) build *.egg-info $(JS_DIR)/node_modules

# The gateway in front of a stand-in Braintrust (tests/fake_braintrust.py) on 127.0.0.1: no account, no
# network. Prints the SDK environment; Ctrl-C stops both. TRY_PORT=0 takes any free port.
TRY_PORT ?= 8080
try: $(RUN_STAMP)
	$(BIN)/python -m tests.try_offline --port $(TRY_PORT)
