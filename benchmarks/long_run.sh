#!/bin/bash
# The long run: mnist5k, 100 clients, 10 per round, the fmnist-lenet5 preset on raw 0-255 pixels.
#   benchmarks/long_run.sh OUT_DIR [ROUNDS [VARIANT...]]
# ROUNDS defaults to 300; VARIANTs (default: all, in this order) are the names below, so two shells can
# share the work. Every run resumes where it stopped and is skipped once finished; one thread each.
# Once every variant has finished: `spafl-fl compare` (final accuracy, both densities, bits, FLOPs, train time,
# plots) into OUT_DIR/compare, and the per-window tables and per-round plots into OUT_DIR/rounds.
set -euo pipefail
out=$1; rounds=${2:-300}; shift $(( $# < 2 ? $# : 2 ))
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
export PYTHONPATH=$here:$here/python${PYTHONPATH:+:$PYTHONPATH}
declare -A flags=(
    [fedavg]="--algorithm fedavg"
    [local]="--algorithm local"
    [spafl-lazy]=""
    [spafl-lazy-last]="--global-update lazy-last"
    [spafl-eager]="--global-update eager"
    [spafl-fresh]="--client-optimizer fresh"
    [spafl-sparse-classifier]="--classifier sparse --client-optimizer fresh"
    [spafl-masked]="--backend reference"
)
order=(fedavg local spafl-lazy spafl-lazy-last spafl-eager spafl-fresh spafl-sparse-classifier spafl-masked)
for name in "${@:-${order[@]}}"; do
    [ -n "${flags[$name]+set}" ] || { echo "unknown variant $name (one of ${order[*]})" >&2; exit 2; }
    [ -f "$out/$name/summary.json" ] && continue
    # shellcheck disable=SC2086
    "$py" -m spafl_fl run --preset fmnist-lenet5 --dataset mnist5k --input-scale 255 --rounds "$rounds" --seed 1 \
        --threads 1 --no-progress --no-baseline ${flags[$name]} --out "$out/$name" \
        $([ -f "$out/$name/checkpoint.json" ] && echo --resume)
done
for name in "${order[@]}"; do [ -f "$out/$name/summary.json" ] || exit 0; done
"$py" -m spafl_fl compare "${order[@]/#/$out/}" --plots "$out/compare" --overwrite
labels=()
for name in "${order[@]}"; do labels+=("$name=$out/$name"); done
"$py" "$here/benchmarks/compare_authors.py" --out "$out/rounds" --windows "1-3,28-30,98-100,$((rounds - 2))-$rounds" \
    --layers conv1,conv2,fc3,fc4 \
    "${labels[@]}"
