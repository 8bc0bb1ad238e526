# Two commands for a fresh machine: `make run` (the pipeline on the builtin corpus, CPU, smoke
# preset) and `make test`. Each creates .venv and installs what it needs first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# PRESET renders params.yaml from presets/$(PRESET).yaml first; without it params.yaml is run as it
# is (the committed one is the smoke preset). SET: space-separated section.key=value overrides.
PRESET ?=
SET    ?=
VIA    ?= dvc
STAMP  := $(VENV)/.installed-stamp
# The local Prefect server the deployment targets use (make prefect-server / deploy / worker).
PREFECT_PORT ?= 4200
# A port number and nothing else: it is pasted into the server's, deploy's and worker's command lines.
override PREFECT_PORT := $(value PREFECT_PORT)
without_digits = $(if $(2),$(call without_digits,$(subst $(firstword $(2)),,$(1)),$(wordlist 2,10,$(2))),$(1))
ifneq ($(strip $(call without_digits,$(PREFECT_PORT),0 1 2 3 4 5 6 7 8 9)),)
$(error PREFECT_PORT must be a port number)
endif
PREFECT_API  := http://127.0.0.1:$(PREFECT_PORT)/api
# make worker: the work pool it polls and how many flow runs it runs at once (a GPU node: one).
POOL ?= pgolf-process
WORKER_LIMIT ?= 1
# PRESET, SET and VIA reach the recipes' shell as environment variables, never pasted into its
# command line: `SET='k=v;touch X'` must be an override pgolf refuses, not a command the shell runs.
# PGOLF_ARGS sets "$$@" to --preset/--set/... with each value one quoted word (globbing off).
# `$(value ...)` keeps make from expanding them too: `SET='$(shell ...)'` stays text pgolf refuses.
override PRESET := $(value PRESET)
override SET := $(value SET)
override VIA := $(value VIA)
override POOL := $(value POOL)
override WORKER_LIMIT := $(value WORKER_LIMIT)
export PRESET SET VIA POOL WORKER_LIMIT
PGOLF_ARGS = set -f; set -- $${PRESET:+--preset "$$PRESET"}; for s in $$SET; do set -- "$$@" --set "$$s"; done
# bin/stage (dvc.yaml's commands) runs stages with this interpreter, so VENV=elsewhere works too.
export PGOLF_PYTHON := $(abspath $(PY))
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# An in-process run's temporary Prefect server migrates its database first: slow on a busy machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: run test test-e2e install params repro prefect-server deploy worker clean help

help:
	@echo "make run [PRESET=smoke] [SET='k=v ...'] [VIA=dvc|prefect]   run the pipeline (changed stages only)"
	@echo "make test                                   CPU test suite, in-process (a few minutes)"
	@echo "make test-e2e                               end-to-end tests: DVC/Prefect runs, exported scripts, subprocesses"
	@echo "make install                                create .venv with pgolf and its tools"
	@echo "make params PRESET=baseline [SET='k=v ...'] render params.yaml from a preset"
	@echo "make prefect-server / deploy / worker       serve the flow on a local Prefect server"
	@echo "make worker POOL=pgolf-cpu WORKER_LIMIT=4   a worker for another pool (the split pipeline's CPU or GPU part)"

$(STAMP): pyproject.toml
	@python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "pgolf needs Python >= 3.11 (python3 is %d.%d)" % sys.version_info[:2])'
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(STAMP)

run: $(STAMP)
	@$(PGOLF_ARGS); echo "pgolf run $$* --via $$VIA"; $(VENV)/bin/pgolf run "$$@" --via "$$VIA"

test: $(STAMP)
	$(PY) -m pytest -q -m 'not e2e'

test-e2e: $(STAMP)
	$(PY) -m pytest -q -m e2e

params: $(STAMP)
	@$(PGOLF_ARGS); $(PY) -m runner.params "$$@"

# The UI's own API address too: without it the UI served on another port asks 4200's API.
prefect-server: $(STAMP)
	PREFECT_SERVER_UI_API_URL=$(PREFECT_API) $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

deploy: $(STAMP)
	PREFECT_API_URL=$(PREFECT_API) $(PY) -m flows.deploy

# WORKER_LIMIT 1: a worker stands for one GPU node, which runs one job at a time; start one per node.
# A split pipeline's CPU worker (POOL=pgolf-cpu) holds each run while its GPU part runs: a larger limit.
worker: $(STAMP)
	PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect worker start --pool "$$POOL" --limit "$$WORKER_LIMIT"

clean:
	rm -rf artifacts/* data/corpus dvc.lock .dvc/cache .dvc/tmp
	git checkout -- artifacts/.gitignore data/.gitignore
