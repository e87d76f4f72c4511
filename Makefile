# Set-up and the everyday commands. `make demo` and `make test` do everything on a fresh machine:
# a virtual environment in .venv, the dependencies, and the build of lrpfast's C++/CUDA extension.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# No GPU here: torch cannot guess the CUDA arch, so name Ampere and Hopper (the GPU machines are sm_90).
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export CUDA_HOME ?= /usr/local/cuda
# Compile the CUDA sources whenever a toolkit is present, so a CUDA compile error fails the build.
export FORCE_CUDA ?= $(shell test -x $(CUDA_HOME)/bin/nvcc && echo 1 || echo 0)
export MAX_JOBS ?= 2

SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py

.PHONY: demo test bench build clean
demo: $(VENV)/.built
	$(VENV)/bin/lrpfast demo

test: $(VENV)/.built
	$(PY) -m pytest -q

bench: $(VENV)/.built
	$(VENV)/bin/lrpfast bench

build: $(VENV)/.built

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import lrpfast, json; info = lrpfast.build_info(); print(json.dumps(info)); assert info['extension_loaded']"
	touch $@

clean:
	rm -rf build lrpfast/*.so $(VENV)/.built
