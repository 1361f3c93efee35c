#!/usr/bin/env bash
# The MiniLM low-resource sweep on the lent GPU (device tool), grouped (unipelt/grouping): resumable chunks.
# Carry .whl (datasets/hydra wheels), .dev/glue (the 5 local GLUE tasks) and MiniLM (bf16, in two parts: the calls
# experiments/prepare_device.sh lists)
# and .sweep (the records so far, restored from the previous chunk's $OUT/runs.tgz). Settings as the committed
# sweep (eval batch 256, a checkpoint at most every 120 s) plus bf16 autocast (PRECISION=no: fp32, as the per-run
# low_resource_minilm records). RUNS, KS, METHODS, WPD pick the slice.
#   BUDGET: seconds this chunk may take; MARGIN: seconds kept for the groups in flight to finish.
set -u
out=${OUT:-sweep_out}; mkdir -p "$out"
runs=${RUNS:-.sweep/low_resource_minilm/runs}
mkdir -p "$runs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
budget=${BUDGET:-560}; margin=${MARGIN:-150}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
# GPU busy: sample utilization.gpu every second while the sweep runs
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 1 > "$out/gpu_util.csv" &
smi=$!
left=$((budget - SECONDS))
timeout -s KILL $((left - 10)) python3 experiments/sweep.py --runs-dir "$runs" --mode grouped \
  --workers-per-device "${WPD:-6}" --ks "${KS:-100,500,1000}" --methods "${METHODS:-finetune,bitfit,adapter,prefix,lora,unipelt_ap,unipelt_apl,unipelt_apl_nogate}" \
  --deadline $((left - margin)) --log "$out/sweep_log.jsonl" \
  --set model.path=.dev/minilm --set data.dir=.dev/glue --set train.mixed_precision="${PRECISION:-bf16}" \
  --set train.eval_batch_size=256 --set train.checkpoint_every_s=120 --set train.cuda_graph=false ${EXTRA:-} 2>&1 | grep -vE "Loading weights|^done " | tail -40
kill $smi
python3 - "$out/gpu_util.csv" <<'PY'
import sys
rows = [l.split(",") for l in open(sys.argv[1]) if l.count(",") >= 2]
u = [float(r[1].strip().split()[0]) for r in rows]
if u:
    busy = [x for x in u if x > 0]
    print(f"GPU utilization over {len(u)} s: mean {sum(u)/len(u):.1f}%, mean while >0: {sum(busy)/max(len(busy),1):.1f}%")
PY
tar czf "$out/runs.tgz" --exclude=checkpoint --exclude='*.lock' --exclude=modules "$runs"
ls "$runs" | wc -l
