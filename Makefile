# The two quick-start commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench clean setup sysdeps docs

setup: $(STAMP) sysdeps

# The venv is rebuilt whenever the project's declared dependencies change. The example gateway
# is installed in development mode too, so everything imports it as `device_gateway.*`.
$(STAMP): pyproject.toml examples/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet -e examples
	touch $(STAMP)

# Debian tools the fault tests and the gateway's real-client tests use (iproute2 for namespaces,
# mosquitto's clients and broker). Installed only when missing and only when we are root with apt.
# docdeps: Python's and attrs' inventories for the docs' links (optional; never fails).
sysdeps:
	@bash scripts/sysdeps.sh
	@bash scripts/docdeps.sh

demo: setup
	$(PY) examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples docs/howto docs/conf.py docs/_ext
	$(VENV)/bin/ruff format --check src tests benchmarks examples docs/howto docs/conf.py docs/_ext

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict src

pytest: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# The documentation site, into docs/_build/html; warnings are errors, as in the test suite
# (tests/test_docs.py builds it the same way and runs its examples).
docs: setup
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

bench: setup
	$(PY) benchmarks/registry.py

clean:
	rm -rf $(VENV) build dist docs/_build src/*.egg-info examples/*.egg-info .mypy_cache .ruff_cache .hypothesis
