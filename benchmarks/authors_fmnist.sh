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
ours ours-split-authors-fresh --split authors --client-optimizer fresh
ours ours-split-authors-before --split authors --classifier sparse --client-optimizer fresh
ours local-split-authors --algorithm local --split authors --client-optimizer fresh
ours ours
ours replica --split authors --global-update lazy-last --client-optimizer persistent \
    --collapse-guard before-forward --batch-order authors --backend reference --classifier sparse
"$py" "$here/benchmarks/compare_authors.py" --out "$out/compare" "their loop=$out/authors" \
    "ours=$out/ours-split-authors" "ours, fresh optimizer=$out/ours-split-authors-fresh" \
    "ours before=$out/ours-split-authors-before" "Local=$out/local-split-authors" \
    "ours, our split=$out/ours" "ours + every authors' option=$out/replica"
