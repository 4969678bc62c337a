# The two commands a new user needs (see README.md):
#   make run    set everything up, then run the default distillation
#   make test   set everything up, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lab clean

setup:
	VENV=$(VENV) bash scripts/setup.sh

run: setup
	$(PY) -m kdlab train

test: setup
	$(PY) -m pytest

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf runs data/cache
