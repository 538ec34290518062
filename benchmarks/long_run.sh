#!/bin/bash
# The long run: mnist5k, 100 clients, 10 per round, the fmnist-lenet5 preset on raw 0-255 pixels.
#   benchmarks/long_run.sh OUT_DIR [ROUNDS]     (ROUNDS defaults to 300; every run resumes where it stopped)
# SpaFL with each global update, masked-dense SpaFL (--backend reference), FedAvg and Local, one thread each,
# then `spafl-fl compare` (accuracy, both densities, bits, FLOPs, time per round, plots) into OUT_DIR/compare.
set -euo pipefail
out=$1; rounds=${2:-300}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
export PYTHONPATH=$here:$here/python${PYTHONPATH:+:$PYTHONPATH}
run() { local name=$1; shift; [ -f "$out/$name/summary.json" ] && return 0
    "$py" -m spafl_fl run --preset fmnist-lenet5 --dataset mnist5k --input-scale 255 --rounds "$rounds" --seed 1 \
        --threads 1 --no-progress "$@" --out "$out/$name" $([ -f "$out/$name/checkpoint.json" ] && echo --resume); }
run fedavg --algorithm fedavg
run local --algorithm local
run spafl-lazy
run spafl-lazy-last --global-update lazy-last --no-baseline
run spafl-eager --global-update eager --no-baseline
run spafl-masked --backend reference
"$py" -m spafl_fl compare "$out"/spafl-lazy "$out"/spafl-lazy-last "$out"/spafl-eager "$out"/spafl-masked \
    "$out"/fedavg "$out"/local --plots "$out/compare"
