#!/usr/bin/env bash
# Side by side on one GPU in one call (device tool): the same slice of the MiniLM low-resource grid
# (K=$K, 5 tasks x 5 seeds x 8 methods) grouped (sweep.py --mode grouped) and packed (16 processes, the per-run
# trainer as before grouping: group.enabled=false), each from an empty runs folder, then the rest of the time on
# the main sweep. Carry .whl .dev .sweep. Prints one JSON line per mode for sweep_throughput.json.
set -u
out=${OUT:-side_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
K=${K:-100}
common=(--ks "$K" --set model.path=.dev/minilm --set data.dir=.dev/glue --set train.mixed_precision=bf16
        --set train.eval_batch_size=256 --set train.checkpoint_every_s=120)
dev=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
measure() {  # mode runs_dir extra...
  local mode=$1 dir=$2; shift 2
  rm -rf "$dir"; mkdir -p "$dir"
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -l 1 > "$out/util_$mode.txt" & local smi=$!
  local t0=$(date +%s.%N)
  python3 experiments/sweep.py --runs-dir "$dir" --mode "$mode" "${common[@]}" --log "$out/log_$mode.jsonl" "$@" 2>&1 \
    | grep -E "runs to do|runs in|finished|error" | tail -5
  local t1=$(date +%s.%N); kill $smi
  python3 - "$mode" "$dir" "$t0" "$t1" "$out/util_$mode.txt" "$dev" "$K" <<'PY' | tee -a "$out/rows.jsonl"
import glob, json, sys
mode, d, t0, t1, util, dev, k = sys.argv[1:]
n = sum(json.load(open(f)).get("status") == "complete" for f in glob.glob(f"{d}/*/record.json"))
wall = float(t1) - float(t0)
u = [float(x) for x in open(util).read().split() if x.strip().replace(".", "").isdigit()]
print(json.dumps({"k": int(k), "mode": mode, "gpus": 1, "runs": n, "wall_s": round(wall, 1),
                  "runs_per_hour": round(3600 * n / wall), "device": dev,
                  "gpu_busy_mean_pct": round(sum(u) / max(len(u), 1), 1)}))
PY
}
measure grouped .sweep/side/grouped --workers-per-device "${WPD:-5}" --max-runs 35
measure packed .sweep/side/packed --workers 16 --deadline "${PACKED_WINDOW:-120}" --set group.enabled=false
tar czf "$out/side.tgz" --exclude=checkpoint --exclude='*.lock' --exclude=modules .sweep/side
left=$((${BUDGET:-540} - SECONDS))
if [ "$left" -gt 90 ]; then
  timeout -s KILL $((left - 10)) python3 experiments/sweep.py --runs-dir .sweep/low_resource_minilm/runs --mode grouped \
    --workers-per-device 4 --max-runs 35 --ks 100,500,1000 --deadline $((left - 80)) --log "$out/main_log.jsonl" \
    "${common[@]:2}" 2>&1 | grep -E "runs to do|runs in|finished" | tail -3
fi
tar czf "$out/runs.tgz" --exclude=checkpoint --exclude='*.lock' --exclude=modules .sweep/low_resource_minilm
