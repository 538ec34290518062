#!/usr/bin/env bash
# GPU check (docs/DESIGN.md §7): on a CUDA machine, install this working tree against the machine's own torch
# and triton, run the GPU tests, then the benchmark, and write everything into OUT_DIR:
#
#   environment.txt            nvidia-smi, versions, `python -m spafl_kernels.info`
#   install.log                the editable install (extension build included)
#   tests-triton*.log/.xml     tests/test_triton_backend.py on the GPU, triton required (all tests with
#                              one fixed tile; the full-size and CUDA-graph tests again, autotuned)
#   tests-cuda.log/.xml        tests/test_cuda.py (GPU tests of the cuda backend), cuda required
#   <gpu>.json/.md/.png        spafl-bench on the GPU: every layer, densities 1 0.5 0.25 0.1,
#                              forward and forward+backward, outer and identity STE (commit these
#                              as benchmarks/results/<gpu>.*)
#
# Usage: benchmarks/gpu_check.sh OUT_DIR [install] [test] [bench]   (default: all three, in order)
#        benchmarks/gpu_check.sh OUT_DIR quick
# Each stage fits the 10 minutes a device command may take; run them one by one where that matters.
# `quick` fits a short GPU window as ONE command, under 8 minutes on an H200 (docs/DESIGN.md §7): install for
# sm_90 only with every core, the triton tests with one fixed tile on the shapes that matter, the cuda
# tests, and the large layers at densities 1, 0.5, 0.1 (forward+backward, outer STE); every stage's
# timeout is cut to what is left of a 450 s budget, and each prints one summary line.
# The bench stage uses spafl-bench's --device/--json/--markdown/--plot options.
# Nothing is downloaded: pip runs with --no-index --no-deps --no-build-isolation. Every stage runs even
# when an earlier one failed (a failed build still leaves the pure-Python package and Triton kernels);
# the exit status is non-zero if any stage failed. Budget: about 10 minutes on an H200, most of it
# Triton compiling and autotuning kernels on first use (cached in ~/.triton for later runs).
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR [install] [test] [bench]" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
shift
STAGES=${*:-install test bench}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
status=0

log() { echo "== $(date +%H:%M:%S) $*" | tee -a "$OUT/gpu_check.log"; }
START=$SECONDS
BUDGET=${SPAFL_GPU_BUDGET:-0}  # seconds for the whole run (quick: 450); 0: no budget
# cap SECONDS: the timeout for the next stage, at most SECONDS and at most what is left of the budget.
cap() {
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$BUDGET" -le 0 ] || [ "$1" -lt "$left" ]; then echo "$1"; else echo $((left > 0 ? left : 1)); fi
}
fail() { log "FAILED: $*"; status=1; }

gpu_name() {
    $PY -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))"
}

environment() {
    {
        nvidia-smi || true
        $PY -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
        $PY -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
        $PY -m spafl_kernels.info || true
    } >"$OUT/environment.txt" 2>&1
}

install() {
    log "install (editable, against the machine's torch; log: install.log)"
    # The extension build compiles the CUDA kernels when torch has CUDA and a toolkit is found.
    if ! MAX_JOBS=$(nproc) timeout "$(cap 420)" $PY -m pip install --no-index --no-deps --no-build-isolation -e . \
            >"$OUT/install.log" 2>&1; then
        fail "install (see install.log); testing the tree through PYTHONPATH, without the C++/CUDA extension"
    else
        log "install: done in $((SECONDS - START)) s"
    fi
    environment
}

run_tests() {  # run_tests NAME VAR=VALUE... -- PYTEST_ARGS...
    local name=$1 envs=()
    shift
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    log "tests $name: ${envs[*]} pytest $* (log: tests-$name.log)"
    if ! timeout "$(cap 600)" env "${envs[@]}" $PY -m pytest -q -rfEs -p no:cacheprovider --junitxml="$OUT/tests-$name.xml" \
            "$@" >"$OUT/tests-$name.log" 2>&1; then
        fail "tests $name: $(tail -n 1 "$OUT/tests-$name.log")"
    else
        log "tests $name: $(tail -n 1 "$OUT/tests-$name.log")"
    fi
}

bench() {  # bench [SPAFL-BENCH ARGS...] (default: every layer, densities 1 0.5 0.25 0.1, both modes and STEs)
    local args=("$@") gpu
    [ ${#args[@]} -gt 0 ] || args=(--layers all --densities 1 0.5 0.25 0.1 --modes fwd fwd+bwd --ste outer identity --reps 7)
    gpu=$(gpu_name) || { fail "no CUDA device for the benchmark"; return; }
    local plot=(--plot "$OUT/$gpu.png")
    if ! $PY -c "import matplotlib" 2>/dev/null; then
        log "matplotlib is not installed: no plot (draw it later from $gpu.json)"
        plot=()
    fi
    log "bench on $gpu (spafl-bench; writes $gpu.json, $gpu.md${plot:+, $gpu.png}; log: bench.log)"
    if ! timeout "$(cap 540)" $PY -m spafl_kernels.bench --device cuda "${args[@]}" \
            --json "$OUT/$gpu.json" --markdown "$OUT/$gpu.md" "${plot[@]}" >"$OUT/bench.log" 2>&1; then
        fail "bench (see bench.log)"
    else
        log "bench: done at $((SECONDS - START)) s; targets: $(grep -c -i 'missed' "$OUT/$gpu.md" || true) lines say MISSED"
    fi
}

# Without an install the tree itself is importable (pure Python, Triton kernels included).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for stage in $STAGES; do
    case $stage in
        install) install ;;
        test)
            environment
            # Every triton test on the GPU with one fixed tile (correctness over many shapes and
            # dtypes without autotuning each), then the full-size, no-sync and CUDA-graph tests autotuned.
            run_tests triton SPAFL_REQUIRE_BACKENDS=triton SPAFL_TRITON_AUTOTUNE=0 -- tests/test_triton_backend.py
            run_tests triton-autotuned SPAFL_REQUIRE_BACKENDS=triton -- tests/test_triton_backend.py \
                -k "full_size or synchronisation or cuda_graph"
            run_tests cuda SPAFL_REQUIRE_BACKENDS=cuda -- tests/test_cuda.py
            ;;
        bench) bench ;;
        quick)
            BUDGET=${SPAFL_GPU_BUDGET:-450}
            TORCH_CUDA_ARCH_LIST=9.0 install
            # One fixed tile: correctness over the shapes, dtypes, STEs and layouts, no autotuning.
            run_tests triton SPAFL_REQUIRE_BACKENDS=triton SPAFL_TRITON_AUTOTUNE=0 SPAFL_HYPOTHESIS_EXAMPLES=20 -- \
                tests/test_triton_backend.py tests/test_layouts.py -k triton
            run_tests cuda SPAFL_REQUIRE_BACKENDS=cuda -- tests/test_cuda.py
            bench --layers large --densities 1 0.5 0.1 --modes fwd+bwd --ste outer --reps 5
            ;;
        *) echo "unknown stage: $stage (install, test, bench, quick)" >&2; exit 2 ;;
    esac
done
log "done (status $status); results in $OUT"
exit $status
