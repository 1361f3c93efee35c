#!/usr/bin/env bash
# The paper's low-resource sweep: 8 tasks x K 100,500,1000 x data seeds 111..555 x 12 methods (1,440 runs).
#   bash experiments/low_resource.sh data.dir=hub                         # all 8 tasks (qqp/mnli/qnli from the hub)
#   bash experiments/low_resource.sh task=cola,sst2,mrpc,stsb,rte         # the 5 tasks with local train files
#   bash experiments/low_resource.sh hydra/launcher=slurm                 # one SLURM job per run
# Re-running the same command skips complete runs. RUNS_DIR / REPORT_DIR move the output.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS_DIR:-runs/low_resource}
report=${REPORT_DIR:-reports/low_resource}
unipelt experiment=low_resource output.runs_dir="$runs" "$@"
unipelt-report "$runs" --out "$report" --expected-seeds 5
