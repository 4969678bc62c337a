# The two commands a new user needs (see README.md):
#   make run    set up (without the browser test's chromium), then run the default distillation
#   make test   set everything up, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test test-fast lint format lab clean

setup:
	VENV=$(VENV) bash scripts/setup.sh

# set-up without chromium (KDLAB_SKIP_BROWSER=1): only tests/test_browser.py needs it, and `make test`'s set-up
# still installs it. A line of its own, not `run: setup`: make builds `setup` once, so `make run test` would
# leave the tests without chromium.
run:
	VENV=$(VENV) KDLAB_SKIP_BROWSER=1 bash scripts/setup.sh
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

# says which course profile the notebooks will pick, and how to choose another, before JupyterLab starts
lab: setup
	@$(PY) -c "import kdlab.course as c; print('kdlab course:', c.profile()); print('  another size: KDLAB_PROFILE=ci|cpu|gpu|reference make lab (ci: ~2 min a notebook on 2 cores; reference: replays, no training)')"
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf runs data/cache
