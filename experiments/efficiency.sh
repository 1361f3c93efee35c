#!/usr/bin/env bash
# Efficiency, two views, one report folder (default reports/efficiency):
#  1. benchmark: `unipelt-bench` times a training step, inference and peak memory of every method on the same
#     fixed batches in one process (+ HF peft LoRA/prefix when peft is installed) -> bench.json, bench.md, and
#     efficiency_bench.md (efficiency_table_from_bench, relative to peft_lora, else finetune);
#  2. records: a one-task sweep over all methods (experiment=efficiency: SST-2, K=1000, data seed 111) ->
#     runs/efficiency, then unipelt-report -> efficiency.md (real data, relative to finetune) and the other tables.
#   bash experiments/efficiency.sh [sweep overrides]
#   BENCH_ARGS="--models minilm --dtypes fp32 --batches 16 --steps 10" bash experiments/efficiency.sh   # CPU
#   SKIP_BENCH=1 / SKIP_SWEEP=1 leave one view out; METHODS=lora,unipelt_apl narrows the sweep.
#   bash experiments/efficiency.sh --render BENCH.json OUT.md     # only render saved benchmark rows
set -euo pipefail

render() {  # render(bench.json, out.md): the efficiency table of saved unipelt-bench rows, headed by their command/device
  python - "$1" "$2" <<'PY'
import json, sys
from unipelt.report.tables import efficiency_table_from_bench

src, dst = sys.argv[1], sys.argv[2]
data = json.load(open(src))
rows, meta = data["rows"], data.get("meta", {})
ref = "peft_lora" if any(r.get("method") == "peft_lora" for r in rows) else "finetune"
head = (f"Rendered from `{src}` with `efficiency_table_from_bench(rows, reference={ref!r})`.\n\n"
        f"Benchmark: `{meta.get('command', '?')}` on {meta.get('device', '?')} (torch {meta.get('torch', '?')}).\n"
        "Per row: Step = median training step (forward + backward + AdamW) and Infer = median no-grad forward of "
        "one batch, in ms; Peak mem = peak allocated CUDA memory over the row's training and inference, in MiB "
        "(NaN on CPU); random token batches of the row's size, "
        f"sequence length {', '.join(str(x) for x in sorted({r.get('length', '?') for r in rows}, key=str))}. "
        "Trainable includes the "
        "task head (unipelt's head has the pooler dense layer, peft's SEQ_CLS head only the classifier); "
        "% = trainable / encoder parameters. bert-base has random weights (timing only).\n\n")
open(dst, "w").write(head + efficiency_table_from_bench(rows, reference=ref).to_markdown())
print(f"wrote {dst}")
PY
}

if [[ "${1:-}" == "--render" ]]; then
  render "$2" "$3"
  exit 0
fi

cd "$(dirname "$0")/.."  # the sweep and its default output paths are relative to the repository root

report=${REPORT_DIR:-reports/efficiency}
runs=${RUNS_DIR:-runs/efficiency}
mkdir -p "$report"
if [[ -z "${SKIP_BENCH:-}" ]]; then
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
  unipelt-bench ${BENCH_ARGS:---models bert-base,minilm --dtypes fp32,bf16 --batches 16,32} --out "$report/bench.json"
  render "$report/bench.json" "$report/efficiency_bench.md"
fi
if [[ -z "${SKIP_SWEEP:-}" ]]; then
  # One process per method (not one in-process multirun): on CPU a record's peak memory is the process's max RSS,
  # which cannot be reset between runs (CUDA's peak is reset per run), so only a fresh process gives a per-run peak.
  methods=${METHODS:-$(python -c 'from hydra import compose, initialize_config_dir
from unipelt.confdir import CONF_DIR
with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
    print(compose("config", ["experiment=efficiency"], return_hydra_config=True).hydra.sweeper.params.method)')}
  for method in ${methods//,/ }; do
    unipelt experiment=efficiency method="$method" output.runs_dir="$runs" "$@"
  done
  unipelt-report "$runs" --out "$report" --expected-seeds 1
fi
