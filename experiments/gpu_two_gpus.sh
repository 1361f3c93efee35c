#!/usr/bin/env bash
# Issue 14: one slice of the MiniLM low-resource grid, grouped, on GPUS=1 (GPU 0 only) or GPUS=2 (both GPUs of the
# host), from an empty runs folder and with a fixed group size so that both counts plan the same groups (and so
# train the same runs the same way). One device call per count, back to back on one warm two-GPU machine; carry
# .whl .dev (experiments/prepare_device.sh). Writes to $OUT: the row for sweep_throughput.json, the sweep's output
# and per-job log (began_s, wall_s, device: the timeline), nvidia-smi busy % per GPU, and the records (tgz).
#   GPUS=1 K=100 MAXRUNS=12 WPD=4 bash experiments/gpu_two_gpus.sh
#   GPUS=2 K=100 MAXRUNS=12 WPD=4 bash experiments/gpu_two_gpus.sh
#   python experiments/compare_records.py A_DIR B_DIR      (here, on the two tgz's: same metrics?)
# Also used for one-GPU rows: QUEUE=Q (queued groups, sweep.py --queue), MPS=1 (processes under NVIDIA MPS),
# COSTS=experiments/results/low_resource_minilm/runs (earlier records rank the groups: longest first),
# GROUP_GRAPH=1 (group.cuda_graph=true: graphed grouped steps), TAG=name (appended to the output names, for A/B calls),
# EXTRA="--set group.activations=bf16" (more sweep.py arguments).
set -u
out=${OUT:-two_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
GPUS=${GPUS:-1}; K=${K:-100}
dev=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
visible=$(seq -s, 0 $((GPUS - 1)))
tag=${TAG:-}
dir=.sweep/two/gpus$GPUS$tag; rm -rf "$dir"; mkdir -p "$dir"
nvidia-smi -i "$visible" --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 \
  > "$out/util_gpus$GPUS$tag.txt" &
smi=$!
# MPS=1: the sweep runs its processes under NVIDIA MPS (sweep.py --mps on starts the daemon and asks it to quit after),
# so that kernels of the group and solo processes run side by side on the GPU instead of time-slicing it; MPS=auto|on|off
# too; default off (as the rows measured before MPS was the sweep's default)
mps=${MPS:-off}; [ "$mps" = 1 ] && mps=on; [ "$mps" = 0 ] && mps=off
t0=$(date +%s.%N)
CUDA_VISIBLE_DEVICES=$visible timeout -s KILL "${LIMIT:-540}" python3 experiments/sweep.py --runs-dir "$dir" \
  --mode grouped --ks "$K" --tasks "${TASKS:-cola,sst2,mrpc,stsb,rte}" --seeds "${SEEDS:-111,222,333,444,555}" \
  --max-runs "${MAXRUNS:-12}" ${QUEUE:+--queue "$QUEUE"} ${COSTS:+--costs-from "$COSTS"} --workers-per-device "${WPD:-4}" --mps "$mps" --log "$out/log_gpus$GPUS$tag.jsonl" \
  --set model.path=.dev/minilm --set data.dir=.dev/glue --set train.mixed_precision=bf16 \
  --set train.eval_batch_size=256 --set train.checkpoint_every_s=120 --set train.cuda_graph=false ${GROUP_GRAPH:+--set group.cuda_graph=true} ${EXTRA:-} > "$out/sweep_gpus$GPUS$tag.txt" 2>&1
t1=$(date +%s.%N); kill $smi
grep -v "Loading weights" "$out/sweep_gpus$GPUS$tag.txt" | tail -n 4
python3 experiments/throughput_row.py "$dir" "$t0" "$t1" --k "$K" --mode grouped --gpus "$GPUS" --device "$dev" \
  --util "$out/util_gpus$GPUS$tag.txt" | tee "$out/row_gpus$GPUS$tag.json"
tar czf "$out/records_gpus$GPUS$tag.tgz" --exclude=checkpoint --exclude='*.lock' --exclude=modules "$dir"
