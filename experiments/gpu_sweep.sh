#!/usr/bin/env bash
# Low-resource sweep chunk on the lent GPU (device tool), packed (one run per process; the way the committed
# low_resource_minilm records were made), resuming from records already in the runs dir.
# Phase 1 (P1 seconds, 0 = skip) runs one experiment at a time (the "before" throughput); phase 2 packs WORKERS
# processes on the GPU until BUDGET seconds after this script started, leaving MARGIN seconds for the runs in
# flight to finish (a run still going at the hard stop is killed with the pool and redone by the next chunk).
# Carry .whl (datasets/hydra wheels), .dev/glue (the 5 local tasks) and MiniLM as bf16 safetensors in two parts
# (assembled into .dev/minilm; the calls experiments/prepare_device.sh lists).
# Speed settings that do not change results: eval batch 256, a checkpoint at most every 120 s. train.cuda_graph=false:
# the committed records were trained without CUDA graphs (the default "auto" would graph these per-run runs).
set -u
out=${OUT:-sweep_out}; mkdir -p "$out"
runs=experiments/results/low_resource_minilm/runs
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
# MPS=auto|on: the sweep under NVIDIA MPS (sweep.py --mps); default off, as in the rows measured before it
common=(--mps "${MPS:-off}" --runs-dir "$runs" --set group.enabled=false --set model.path=.dev/minilm --set data.dir=.dev/glue --log "$out/sweep_log.jsonl"
        --set train.eval_batch_size=256 --set train.checkpoint_every_s=120 --set train.cuda_graph=false)
budget=${BUDGET:-560}; margin=${MARGIN:-200}
if [ "${P1:-0}" != 0 ]; then
  python3 experiments/sweep.py --mode packed "${common[@]}" --workers 1 --deadline "$P1" 2>&1 | grep -E "runs to do|error|finished" | tail -20
fi
left=$((budget - SECONDS))
timeout -s KILL $((left - 15)) python3 experiments/sweep.py --mode packed "${common[@]}" --workers "${WORKERS:-16}" \
  --deadline $((left - margin)) 2>&1 | grep -E "runs to do|error|finished" | tail -20
tar czf "$out/runs.tgz" --exclude=checkpoint --exclude='*.lock' "$runs"
