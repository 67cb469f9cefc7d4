# The two commands a fresh clone needs:
#   make run    set up .venv and run the local smoke training run on the bundled mini NQ-open task
#   make test   set up .venv and run the test suite (CPU, 8 simulated devices)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# loadgroup: tests marked with one xdist_group share a worker (and their module fixtures).
PYTEST_ARGS ?= -n 2 --dist loadgroup

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

# The local smoke run is a CPU run (and libtpu, installed for the tests' TPU compilation, must not probe for a
# TPU here); on accelerators run `python -m experiments.train_nq` directly.
run: setup
	JAX_PLATFORMS=cpu $(PY) -m experiments.train_nq

# tests/conftest.py gives the tests 8 simulated CPU devices.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) *.egg-info
