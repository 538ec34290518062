# Every target sets up what it needs on a fresh machine: a virtual environment with pinned torch
# (CPU build here; see README "Building"), the tools, then this package (editable, with its C++
# extension). Nothing else has to be installed first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TOOLS := numpy==2.4.6 pytest==9.2.0 pytest-benchmark==5.3.1 ruff==0.17.6 triton==3.9.0 matplotlib==3.10.8
EXT_SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h)

.PHONY: install test lint demo info clean

$(BIN)/.tools:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	$(BIN)/pip install -q --disable-pip-version-check $(TOOLS)
	touch $@

$(BIN)/.installed: $(BIN)/.tools $(EXT_SOURCES)
	MAX_JOBS=2 $(BIN)/pip install -q --disable-pip-version-check --no-build-isolation -e .
	touch $@

install: $(BIN)/.installed

lint: $(BIN)/.tools
	$(BIN)/ruff check .

test: install lint
	SPAFL_REQUIRE_BACKENDS=torch,cpp $(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/python -m spafl_kernels.bench --layers linear-large --densities 1 0.5 0.25 0.1 --modes fwd+bwd --ste outer

info: install
	$(BIN)/python -m spafl_kernels.info

clean:
	rm -rf build *.egg-info spafl_kernels/*.so $(VENV)
