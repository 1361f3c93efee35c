#!/usr/bin/env bash
# The MPNet low-resource sweep on the GPU machine (device tool), grouped, on every visible GPU, resumable.
# The weights travel in parts first (experiments/mpnet_to_device.py: pack here, carry one part per call); this
# script assembles them (sha256-checked) once they are all there, then runs the sweep until BUDGET seconds:
# no new group starts after BUDGET-DRAIN, and the sweep is stopped at BUDGET-15 (in-flight runs keep their
# checkpoints while the machine stays warm, so the next call resumes them). Records come back in $OUT/runs.tgz.
#   BUDGET=540 KS=100 bash experiments/gpu_mpnet_sweep.sh        (carry .whl .dev/glue; parts as mpnet_to_device.py says)
#   [MAXRUNS=12 QUEUE=40: groups of up to 40 runs, 12 at a time, waiting runs take the slots of runs that stop]
set -u
out=${OUT:-mpnet_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
[ -f .dev/mpnet/model.safetensors ] || python3 experiments/mpnet_to_device.py assemble || exit 2
BUDGET=${BUDGET:-540}
left=$((BUDGET - SECONDS))
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader,nounits -l 2 > "$out/util.txt" &
smi=$!
timeout -s KILL $((left - 15)) python3 experiments/sweep.py --runs-dir .sweep/low_resource_mpnet/runs --mode grouped \
  --ks "${KS:-100}" --tasks "${TASKS:-cola,sst2,mrpc,stsb,rte}" --workers-per-device "${WPD:-2}" \
  ${MAXRUNS:+--max-runs "$MAXRUNS"} ${QUEUE:+--queue "$QUEUE"} ${COSTS:+--costs-from "$COSTS"} \
  --deadline $((left - ${DRAIN:-200})) --log "$out/log.jsonl" \
  --set model=mpnet --set model.path=.dev/mpnet --set data.dir=.dev/glue --set train.mixed_precision=bf16 \
  --set train.eval_batch_size=256 --set train.checkpoint_every_s=60 --set train.cuda_graph=false > "$out/sweep.txt" 2>&1
kill $smi
grep -v Loading "$out/sweep.txt" | tail -4
ls .sweep/low_resource_mpnet/runs | wc -l
tar czf "$out/runs.tgz" --exclude=checkpoint --exclude='*.lock' --exclude=modules .sweep/low_resource_mpnet
