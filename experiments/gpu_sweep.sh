#!/usr/bin/env bash
# Low-resource sweep chunk on the lent GPU (device tool), resuming from records already in the runs dir.
# Phase 1 runs one experiment at a time (the "before" throughput), phase 2 packs 12 worker processes on the GPU.
# Carry .whl (datasets/hydra wheels), .dev/minilm (MiniLM as bf16 safetensors), .dev/glue (the 5 local tasks).
set -u
out=${OUT:-sweep_out}; mkdir -p "$out"
runs=experiments/results/low_resource_minilm/runs
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
common=(--runs-dir "$runs" --set model.path=.dev/minilm --set data.dir=.dev/glue --log "$out/sweep_log.jsonl")
python3 experiments/sweep.py "${common[@]}" --workers 1 --deadline ${P1:-50} 2>&1 | grep -E "runs to do|complete|error|finished" | tail -20
python3 experiments/sweep.py "${common[@]}" --workers ${WORKERS:-12} --deadline ${P2:-380} 2>&1 | grep -E "runs to do|error|finished" | tail -20
tar czf "$out/runs.tgz" "$runs"
