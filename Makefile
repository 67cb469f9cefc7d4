# The two commands a fresh clone needs:
#   make run    set up .venv and run the local smoke training run on the bundled mini NQ-open task
#   make test   set up .venv and run the test suite (CPU, 8 simulated devices)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Tests see 8 simulated CPU devices so that sharded code paths run for real.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
PYTEST_ARGS ?= -n 2

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

test: setup
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) *.egg-info
