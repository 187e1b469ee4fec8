# The front door. `make serve` and `make test` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL_DIR ?= models/banking77
DATA ?= data/banking77
HOST ?= 127.0.0.1
PORT ?= 8000
TEST_ARTIFACT := artifacts/test-model/1

.PHONY: help venv install-serve install-all serve test artifact test-artifact bench loadtest clean

help:
	@echo "make serve      serve $(MODEL_DIR) on http://$(HOST):$(PORT)"
	@echo "make test       install everything, build a small artifact, run every test"
	@echo "make artifact   retrain the shipped Banking77 model into models/banking77/1"
	@echo "make bench      benchmark the service (batching on/off, baselines)"
	@echo "make loadtest   headless Locust against a running service"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

venv: $(PY)

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.serve: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[serve]'
	touch $@

$(VENV)/.all: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[serve,export,load,dev]'
	touch $@ $(VENV)/.serve

install-serve: $(VENV)/.serve
install-all: $(VENV)/.all

serve: $(VENV)/.serve
	$(PY) -m service --model-dir $(MODEL_DIR) --host $(HOST) --port $(PORT)

artifact: $(VENV)/.all
	$(PY) -m model_export train $(DATA) --label-column category --out $(MODEL_DIR)/1 --name banking77 --force

# A small, fast artifact for the tests (a stratified sample, one epoch, a narrow model).
$(TEST_ARTIFACT)/manifest.json: $(VENV)/.all $(wildcard model_export/*.py)
	$(PY) -m model_export train $(DATA) --label-column category --out $(TEST_ARTIFACT) --name test-model --force \
		--limit 1600 --epochs 1 --embedding-dim 32 --hidden-size 32 --vocab-size 800 --threads 1 --no-progress

test-artifact: $(TEST_ARTIFACT)/manifest.json

test: $(VENV)/.all test-artifact
	$(PY) -m pytest -q

clean:
	rm -rf artifacts .pytest_cache .hypothesis
