#!/usr/bin/env bash
# Side by side in one call (device tool): the same slice of the MiniLM low-resource grid (K=$K, 5 tasks x 5 seeds x
# 8 methods) grouped (sweep.py --mode grouped: groups + solo workers for fine-tuning) and packed (16 processes, the
# per-run trainer as before grouping: group.enabled=false), each from an empty runs folder and each on one H100.
# With two GPUs visible (CONCURRENT=1, the default there) the two modes run at the same time, grouped on GPU 0 and
# packed on GPU 1 (one host: 32 cores for 7 + 16 processes); with one GPU, one after the other.
# Carry .whl .dev/glue and MiniLM in two parts (experiments/prepare_device.sh). Prints one JSON line per mode (rows of sweep_throughput.json) into $OUT/rows.jsonl.
#   K=100 WINDOW=200 bash experiments/gpu_side_by_side.sh
# SEEDS=111 takes one data seed instead of all five (a 40-run slice). GROUPED_EXTRA adds sweep.py arguments to the grouped mode only (e.g. "--max-runs 12 --queue 18 --set group.cuda_graph=true").
set -u
out=${OUT:-side_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
K=${K:-100}
WINDOW=${WINDOW:-200}   # seconds after which no new work starts (work in flight finishes)
# MPS=auto|on: the sweep under NVIDIA MPS (sweep.py --mps); default off, as in the rows measured before it
common=(--mps "${MPS:-off}" --ks "$K" --seeds "${SEEDS:-111,222,333,444,555}" --set model.path=.dev/minilm --set data.dir=.dev/glue --set train.mixed_precision=bf16
        --set train.eval_batch_size=256 --set train.checkpoint_every_s=120 --set train.cuda_graph=false --deadline "$WINDOW")
ngpu=$(nvidia-smi -L | wc -l)
CONCURRENT=${CONCURRENT:-$([ "$ngpu" -ge 2 ] && echo 1 || echo 0)}
dev=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
measure() {  # mode gpu runs_dir extra...
  local mode=$1 gpu=$2 dir=$3; shift 3
  rm -rf "$dir"; mkdir -p "$dir"
  nvidia-smi -i "$gpu" --query-gpu=utilization.gpu --format=csv,noheader,nounits -l 1 > "$out/util_${mode}_k$K.txt" &
  local smi=$!
  local t0=$(date +%s.%N)
  CUDA_VISIBLE_DEVICES=$gpu python3 experiments/sweep.py --runs-dir "$dir" --mode "$mode" "${common[@]}" \
    --log "$out/log_${mode}_k$K.jsonl" "$@" > "$out/sweep_${mode}_k$K.txt" 2>&1
  local t1=$(date +%s.%N); kill $smi
  local note="one after the other"; [ "$CONCURRENT" = 1 ] && note="both modes at once on two GPUs of one host"
  python3 experiments/throughput_row.py "$dir" "$t0" "$t1" --k "$K" --mode "$mode" --device "$dev" \
    --util "$out/util_${mode}_k$K.txt" --note "$note" | tee -a "$out/rows.jsonl"
}
if [ "$CONCURRENT" = 1 ]; then
  measure grouped 0 .sweep/side/grouped_k$K --workers-per-device "${WPD:-3}" ${GROUPED_EXTRA:-} &
  measure packed 1 .sweep/side/packed_k$K --workers 16 --set group.enabled=false &
  wait
else
  measure grouped 0 .sweep/side/grouped_k$K --workers-per-device "${WPD:-3}" ${GROUPED_EXTRA:-}
  measure packed 0 .sweep/side/packed_k$K --workers 16 --set group.enabled=false
fi
tail -n 3 "$out"/sweep_*_k$K.txt
tar czf "$out/side_k$K.tgz" --exclude=checkpoint --exclude='*.lock' --exclude=modules .sweep/side/*_k$K
