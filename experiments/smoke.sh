#!/usr/bin/env bash
# Smoke sweep: the whole pipeline (train -> run records -> report) on CPU in a few minutes.
# 2 tasks (rte, stsb) x 7 methods x K 16,32 x data seeds 111,222 = 56 tiny runs on a 2-layer MiniLM.
#   bash experiments/smoke.sh                        # records: experiments/results/smoke/runs
#   bash experiments/smoke.sh method=lora,bitfit     # any Hydra override narrows or changes the sweep
# Re-running skips runs whose complete record exists. RUNS_DIR / REPORT_DIR move the output.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error}
runs=${RUNS_DIR:-experiments/results/smoke/runs}
report=${REPORT_DIR:-experiments/results/smoke/report}
unipelt experiment=smoke output.runs_dir="$runs" "$@"
find "$runs" -name .lock -delete  # released run locks (a pid each): clutter in the committed example; safe while no other sweep writes here
unipelt-report "$runs" --out "$report" --expected-seeds 2
