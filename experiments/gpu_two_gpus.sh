#!/usr/bin/env bash
# Issue 14: the same slice of the MiniLM low-resource grid, grouped, on one GPU and then on both GPUs of the host
# (device tool, a two-GPU kind), each from an empty runs folder, with the same fixed group size so that both plan
# the same groups. Prints one row per GPU count (rows of sweep_throughput.json) and compares the records' metrics.
#   TASKS=sst2,rte K=100 MAXRUNS=12 bash experiments/gpu_two_gpus.sh     (carry .whl .dev/minilm .dev/glue)
set -u
out=${OUT:-two_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
K=${K:-100}
dev=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
for gpus in 1 2; do
  dir=.sweep/two/gpus$gpus; rm -rf "$dir"; mkdir -p "$dir"
  visible=$([ $gpus = 1 ] && echo 0 || echo 0,1)
  t0=$(date +%s.%N)
  CUDA_VISIBLE_DEVICES=$visible timeout -s KILL "${LIMIT:-240}" python3 experiments/sweep.py --runs-dir "$dir" \
    --mode grouped --ks "$K" --tasks "${TASKS:-sst2,rte}" --max-runs "${MAXRUNS:-12}" --workers-per-device "${WPD:-3}" \
    --set model.path=.dev/minilm --set data.dir=.dev/glue --set train.mixed_precision=bf16 \
    --set train.eval_batch_size=256 --set train.checkpoint_every_s=120 > "$out/sweep_gpus$gpus.txt" 2>&1
  t1=$(date +%s.%N)
  python3 experiments/throughput_row.py "$dir" "$t0" "$t1" --k "$K" --mode grouped --gpus "$gpus" --device "$dev" \
    | tee -a "$out/rows.jsonl"
done
python3 - <<'PY' | tee "$out/compare.txt"
import glob, json, os
a = {os.path.basename(os.path.dirname(f)): json.load(open(f)) for f in glob.glob(".sweep/two/gpus1/*/record.json")}
b = {os.path.basename(os.path.dirname(f)): json.load(open(f)) for f in glob.glob(".sweep/two/gpus2/*/record.json")}
same = [k for k in a if k in b and a[k].get("metrics") == b[k].get("metrics") and a[k].get("dev_score") == b[k].get("dev_score")]
print(f"records: 1 GPU {len(a)}, 2 GPUs {len(b)}, in both {len(set(a) & set(b))}, identical metrics {len(same)}")
PY
tar czf "$out/two.tgz" --exclude=checkpoint --exclude='*.lock' --exclude=modules .sweep/two
