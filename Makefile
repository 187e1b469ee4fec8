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

.PHONY: help venv install-serve install-all serve test test-fast test-venvs artifact test-artifact hf-models encoder-artifact bench bench-tools loadtest docker-ci overload soak constraints clean grpc-descriptors

help:
	@echo "make serve      serve $(MODEL_DIR) on http://$(HOST):$(PORT)"
	@echo "make test       install everything, build a small artifact, run every test (~6 min on 2 cores)"
	@echo "make test-fast  the fast lane: every test not marked slow (no second venv, no Docker, no load; ~2 min)"
	@echo "make artifact   retrain the shipped Banking77 model into models/banking77/1"
	@echo "make bench      the service beside its ceilings and baselines, side by side (~5 min); exits 1 on a failed bar"
	@echo "make loadtest   headless Locust against a running service"
	@echo "make docker-ci  build the image, docker compose up, check answers, stop under load, loadtest profile"
	@echo "make overload   3x capacity for 60 s against a fresh service: no hangs, 503 + Retry-After, recovery (~2 min)"
	@echo "make soak       each mode (batching on, off, 8 texts) for SOAK_SECONDS (30) at 8 clients: no errors, flat RSS and p99"

# Python keeps what it compiles: where the environment says not to (PYTHONDONTWRITEBYTECODE), every process that
# imports torch, transformers or the service would compile them again from source, and the installs below leave
# compiling to the first import.
unexport PYTHONDONTWRITEBYTECODE

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

venv: $(PY)

# Stamp files: reinstall only when pyproject.toml or constraints.txt changes. Every install takes the tested
# versions in constraints.txt (`make constraints` rewrites it from a venv whose tests pass). --no-compile: Python
# compiles a module when it is first imported; compiling every installed file up front is most of an install's CPU
# (measured for .[serve,export,load,dev] into a fresh venv: 104 CPU-seconds with it, 30 without).
$(VENV)/.serve: pyproject.toml constraints.txt | $(PY)
	$(PIP) install --quiet --no-compile -c constraints.txt -e '.[serve]'
	touch $@

$(VENV)/.all: pyproject.toml constraints.txt | $(PY)
	$(PIP) install --quiet --no-compile -c constraints.txt -e '.[serve,export,load,dev]'
	touch $@ $(VENV)/.serve

install-serve: $(VENV)/.serve
install-all: $(VENV)/.all

serve: $(VENV)/.serve
	$(PY) -m service --model-dir $(MODEL_DIR) --host $(HOST) --port $(PORT)

artifact: $(VENV)/.all
	$(PY) -m model_export train $(DATA) --label-column category --out $(MODEL_DIR)/1 --name banking77 --force

# A small, fast artifact for the tests (a stratified sample, a few epochs, a narrow model), in two versions
# (seeds 0 and 1: different weights) for the repository tests.
TEST_TRAIN = $(PY) -m model_export train $(DATA) --label-column category --name test-model --force \
	--limit 1600 --epochs 4 --learning-rate 0.01 --embedding-dim 32 --hidden-size 32 --vocab-size 800 --threads 1 --no-progress
# Two targets, so that `make -j2 test-artifact` (make test does) trains both at once: one thread each.
$(TEST_ARTIFACT)/manifest.json: $(VENV)/.all $(wildcard model_export/*.py) contract.py
	$(TEST_TRAIN) --out $(TEST_ARTIFACT) --seed 0
$(dir $(TEST_ARTIFACT))2/manifest.json: $(VENV)/.all $(wildcard model_export/*.py) contract.py
	$(TEST_TRAIN) --out $(dir $(TEST_ARTIFACT))2 --seed 1

test-artifact: $(TEST_ARTIFACT)/manifest.json $(dir $(TEST_ARTIFACT))2/manifest.json

# Tiny Hugging Face classifier folders (BERT, DistilBERT, RoBERTa, XLM-R, multi-label, slow tokenizer), built here
# without downloads, to try `python -m model_export import` on (the tests build their own: tests/hf_models.py).
hf-models: $(VENV)/.all
	$(PY) -m tests.hf_models artifacts/hf-models

# The encoder the benchmark measures (`make bench MODEL_DIR=artifacts/encoder/bert-4x256`): a 4-layer, 256-wide BERT
# with random weights and a WordPiece vocabulary trained on Banking77, imported as a user's checkpoint would be.
ENCODER_ARTIFACT := artifacts/encoder/bert-4x256/1
$(ENCODER_ARTIFACT)/manifest.json: $(VENV)/.all tests/hf_models.py model_export/hf_import.py contract.py
	$(PY) -m tests.hf_models artifacts/hf-models bert-4x256
	$(PY) -m model_export import artifacts/hf-models/bert-4x256 --out $(ENCODER_ARTIFACT) --force

encoder-artifact: $(ENCODER_ARTIFACT)/manifest.json

# The suite runs on PYTEST_WORKERS processes (pytest-xdist; much of it waits on servers and subprocesses).
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(PYTEST_WORKERS)

# Every test. The virtualenvs some tests need besides .venv (tests/venvs.py: the extras installed alone, the kserve
# client, the peers) are made in the background from the start, while the test artifact trains and the other tests
# run; the tests that use them run last and wait for any still being made.
test: $(VENV)/.all bench-tools
	@mkdir -p artifacts
	@$(PY) tests/venvs.py >artifacts/test-venvs.log 2>&1 & venvs=$$!; \
	trap 'kill $$venvs 2>/dev/null' INT TERM; \
	$(MAKE) --no-print-directory -j2 test-artifact && $(PYTEST) $(PYTEST_ARGS); rc=$$?; \
	wait $$venvs; echo "test virtualenvs (made beside the tests): $$(tail -1 artifacts/test-venvs.log)"; exit $$rc

# The fast lane (README, "Development"): every test not marked slow, so none that needs a second virtualenv,
# Docker or seconds of load; about two minutes.
test-fast: $(VENV)/.all bench-tools
	@$(MAKE) --no-print-directory -j2 test-artifact
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

# Make (or check) the test virtualenvs now, in the foreground.
test-venvs: $(VENV)/.all
	$(PY) tests/venvs.py

# Load testing and benchmarks (README, "Load testing & benchmarks").
LOADTEST_HOST ?= http://$(HOST):$(PORT)
LOADTEST_USERS ?= 64
LOADTEST_TIME ?= 30s
BENCH_ARGS ?=

$(VENV)/.load: pyproject.toml constraints.txt | $(PY)
	$(PIP) install --quiet -c constraints.txt -e '.[locust]'
	touch $@

# wrk and h2load (Debian packages wrk and nghttp2-client) are the harness's closed-loop generators, HTTP/1.1 and gRPC;
# the tests that drive them fail without them.
bench-tools:
	@for tool in wrk:wrk h2load:nghttp2-client; do command=$${tool%%:*}; package=$${tool#*:}; \
		command -v $$command >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
		&& { apt-get install -y -qq $$package >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $$package; }; }; } \
		|| { echo "error: $$command is not installed and cannot be installed here (needs apt-get as root): install $$package"; exit 1; }; \
	done

# Starts every configuration itself on 127.0.0.1 (servers on core 0, load on core 1); about 5 minutes.
bench: $(VENV)/.all bench-tools
	$(PY) -m loadtest.bench --model-dir $(MODEL_DIR) $(BENCH_ARGS)

# Headless Locust against a service that is already running (make serve); reports in loadtest/reports/.
loadtest: $(VENV)/.load
	@mkdir -p loadtest/reports
	$(VENV)/bin/locust -f loadtest/locustfile.py --headless -u $(LOADTEST_USERS) -r $(LOADTEST_USERS) \
		-t $(LOADTEST_TIME) --host $(LOADTEST_HOST) --only-summary --exit-code-on-error 1 \
		--html loadtest/reports/report.html --csv loadtest/reports/locust

# Containers for real (README, "Docker"): lint, then as root on Debian start an engine if needed, build,
# `docker compose up`, classify, stop under load, run the loadtest profile, tear down. Fails where no engine can run.
docker-ci: $(VENV)/.all
	VENV=$(VENV) bash scripts/ci_docker.sh

# Reliability (RELIABILITY.md): each starts its own service on 127.0.0.1 (core 0; load on core 1) and exits 1 when a bar
# fails. Run them one at a time on a quiet machine (e.g. `flock /tmp/cpu-heavy.lock make soak`).
SOAK_SECONDS ?= 30
OVERLOAD_ARGS ?=
overload: $(VENV)/.all
	$(PY) -m loadtest.overload --model-dir $(MODEL_DIR) $(OVERLOAD_ARGS)

soak: $(VENV)/.all
	$(PY) -m loadtest.soak --model-dir $(MODEL_DIR) --seconds $(SOAK_SECONDS)

# The gRPC messages: service/protos/descriptors.binpb compiled from the .proto files beside it by grpcio-tools, in a
# virtualenv of its own (its protobuf 7 clashes with the protobuf 6 tritonclient[grpc] holds the project to; the
# descriptors are plain data, read by any protobuf). tests/test_service_grpc.py checks the committed file is current.
GRPC_TOOLS := grpcio-tools==1.85.1
GRPC_TOOLS_VENV ?= artifacts/grpc-tools
GRPC_DESCRIPTORS ?= service/protos/descriptors.binpb
$(GRPC_TOOLS_VENV)/bin/python:
	$(PYTHON) -m venv $(GRPC_TOOLS_VENV)
	$(GRPC_TOOLS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-compile $(GRPC_TOOLS)

grpc-descriptors: $(GRPC_TOOLS_VENV)/bin/python
	$(GRPC_TOOLS_VENV)/bin/python -m grpc_tools.protoc -Iservice/protos \
		--descriptor_set_out=$(GRPC_DESCRIPTORS) open_inference.proto health.proto

constraints: $(VENV)/.all
	{ sed -n '1,3p' constraints.txt; $(PIP) freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf artifacts .pytest_cache .hypothesis
