# The two commands a new user needs (see README.md):
#   make run    set everything up, then run the default distillation
#   make test   set everything up, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test test-fast lint format lab clean

setup:
	VENV=$(VENV) bash scripts/setup.sh

run: setup
	$(PY) -m kdlab train

# two pytest-xdist workers, one notebook or test file each (conftest.py gives each one core's threads)
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# the unit tests alone (no notebooks, no browser, no multi-process tests): the quick loop while changing kdlab
test-fast: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests --ignore=tests/test_browser.py -m "not process" -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf runs data/cache
