# sage_fast developer entry points.
#   make train   create the environment when missing, then run the default recipe (tiny_world) into
#                runs/tiny_world/<date-time>  (TRAIN_ARGS="section.field=value ..." to override)
#   make test    create the environment when missing, then run the test suite
#   make bench   run bench/run.py on this machine
# Environment: a venv at $(VENV) (default .venv); `make` also builds the C++ extension
# sage_fast._C (SAGE_FAST_NO_EXT=1 skips it). On a machine whose Python already has a CUDA
# torch, use it as is:  make test VENV_FLAGS=--system-site-packages  (torch is never replaced:
# the CPU pins in constraints/cpu.txt apply only when the venv has no CUDA torch).

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sage_fast-installed
PYTEST_ARGS ?=
# The extension sage_fast._C compiles against the installed torch, so the install runs without
# build isolation and these build tools go into the environment first.
BUILD_DEPS := setuptools cmake ninja

TRAIN_ARGS ?=

.PHONY: train test test-all bench env clean-env

env: $(STAMP)

CSRC := $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu)

# (re)install when the build inputs change: editing csrc/ rebuilds the extension
$(STAMP): setup.py CMakeLists.txt constraints/cpu.txt $(CSRC)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		echo "make: CUDA torch found in $(VENV); keeping it (no CPU pins)"; \
		$(PY) -m pip install -q $(BUILD_DEPS) && \
		PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pip install -q --no-build-isolation -e '.[dev]'; \
	else \
		$(PY) -m pip install -q -c constraints/cpu.txt torch $(BUILD_DEPS) && \
		PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pip install -q --no-build-isolation -c constraints/cpu.txt -e '.[dev]'; \
	fi
	@touch $@

train: $(STAMP)
	$(PY) -m sage_fast.train --recipe tiny_world run.output_dir=runs/tiny_world/$$(date +%Y%m%d-%H%M%S) $(TRAIN_ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS) tests

test-all: $(STAMP)
	$(VENV)/bin/pytest -q -m "" $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(PY) bench/run.py

clean-env:
	rm -rf $(VENV) build
