#!/bin/bash
# Reproduce benchmarks/results/authors-fmnist: the authors' FMNIST loop against spafl-fl run on mnist5k.
#   benchmarks/authors_fmnist.sh PATH/TO/SpaFL_NeruIPS_2024 OUT_DIR [ROUNDS]
# Their code is read from PATH (a checkout of github.com/news-vt/SpaFL_NeruIPS_2024), never copied here.
# Every run uses one thread; a 100-round run takes 5-15 minutes on an idle core. Runs of ours resume.
set -euo pipefail
authors=$1; out=$2; rounds=${3:-100}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
export PYTHONPATH=$here:$here/python${PYTHONPATH:+:$PYTHONPATH}
common=(--preset fmnist-lenet5 --dataset mnist5k --input-scale 255 --clients 10 --sample 5 --rounds "$rounds"
        --seed 1 --threads 1 --no-baseline --no-progress)
ours() { local name=$1; shift; [ -f "$out/$name/summary.json" ] || "$py" -m spafl_fl run "${common[@]}" "$@" \
    --out "$out/$name" $([ -f "$out/$name/checkpoint.json" ] && echo --resume); }
[ -f "$out/authors/metrics.jsonl" ] && [ "$(wc -l < "$out/authors/metrics.jsonl")" -ge "$rounds" ] || \
    "$py" "$here/benchmarks/authors_fmnist.py" --authors "$authors" --out "$out/authors" --rounds "$rounds"
ours ours-split-authors --split authors
ours ours-split-authors-persistent --split authors --client-optimizer persistent
ours ours-split-authors-sparse-classifier --split authors --classifier sparse
ours local-split-authors --algorithm local --split authors
ours ours
ours ours-sparse-classifier --classifier sparse
ours local --algorithm local
ours replica --split authors --global-update lazy-last --client-optimizer persistent \
    --collapse-guard before-forward --batch-order authors --backend reference --classifier sparse
"$py" "$here/benchmarks/compare_authors.py" --out "$out/compare" "their loop=$out/authors" \
    "ours, their split=$out/ours-split-authors" \
    "ours + persistent optimizer, their split=$out/ours-split-authors-persistent" \
    "ours + sparse classifier, their split=$out/ours-split-authors-sparse-classifier" \
    "Local, their split=$out/local-split-authors" \
    "ours, our split=$out/ours" "ours + sparse classifier, our split=$out/ours-sparse-classifier" \
    "Local, our split=$out/local" "ours + every authors' option=$out/replica"
