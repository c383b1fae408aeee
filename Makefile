# `make demo` and `make test` do everything on a fresh machine: create .venv, install torch,
# the package (building mas_fast._C where a compiler exists) and the test/demo dependencies.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export CUDA_HOME ?= /usr/local/cuda
STAMP := $(VENV)/.mas_fast-installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)

.PHONY: install demo test bench info clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC) ninja setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[test,demo]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mas_fast demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(PY) -m mas_fast bench $(ARGS)

info: $(STAMP)
	$(PY) -m mas_fast info

clean:
	rm -rf build *.egg-info mas_fast/*.so .pytest_cache .benchmarks
