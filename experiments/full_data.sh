#!/usr/bin/env bash
# Full training data: 8 tasks x data seeds 111..555 x 12 methods (480 runs); GPU/cluster scale.
#   bash experiments/full_data.sh data.dir=hub hydra/launcher=slurm
#   bash experiments/full_data.sh task=cola,sst2,mrpc,stsb,rte data.seed=111,222,333   # and SEEDS=3
# Re-running the same command skips complete runs. RUNS_DIR / REPORT_DIR / SEEDS change the output.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS_DIR:-runs/full_data}
report=${REPORT_DIR:-reports/full_data}
unipelt experiment=full_data output.runs_dir="$runs" "$@"
unipelt-report "$runs" --out "$report" --expected-seeds "${SEEDS:-5}"
