#!/usr/bin/env bash
# Issue 10's whole sweep on one GPU: 8 methods x 5 tasks x K 100/500/1000 x 5 seeds = 600 runs, grouped (queued groups
# of up to 18 runs, 12 at a time, longest first by earlier records), graphed grouped steps, processes under MPS.
# A device call lasts at most 10 minutes, so the sweep runs in chunks: each call resumes the runs folder the previous
# one left on the warm machine (unfinished runs resume from their checkpoints) and stops starting jobs at DEADLINE.
# The sweep's wall time is the sum of the chunks' (each pays its own start-up). Carry .whl .dev (prepare_device.sh).
#   CHUNK=1 bash experiments/gpu_full_sweep.sh; CHUNK=2 bash experiments/gpu_full_sweep.sh   (back to back)
# EXTRA="--set group.activations=bf16" adds sweep.py arguments.
set -u
out=${OUT:-full_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
chunk=${CHUNK:-1}; dir=${RUNS:-.sweep/full600}; mkdir -p "$dir"
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 > "$out/util_$chunk.txt" &
smi=$!
t0=$(date +%s.%N)
source experiments/full_sweep_args.sh
timeout -s KILL "${LIMIT:-570}" python3 experiments/sweep.py --runs-dir "$dir" "${FULL_SWEEP[@]}" \
  --deadline "${DEADLINE:-420}" --log "$out/log_$chunk.jsonl" ${EXTRA:-} > "$out/sweep_$chunk.txt" 2>&1
t1=$(date +%s.%N); kill $smi
grep -v "Loading weights" "$out/sweep_$chunk.txt" | grep -v "^done " | tail -n 6
python3 - "$dir" "$t0" "$t1" "$chunk" <<'PY' | tee "$out/chunk_$chunk.json"
import glob, json, sys
done = sum(1 for p in glob.glob(f"{sys.argv[1]}/*/record.json") if json.load(open(p)).get("status") == "complete")
print(json.dumps({"chunk": int(sys.argv[4]), "wall_s": round(float(sys.argv[3]) - float(sys.argv[2]), 1),
                  "complete_after": done}))
PY
tar czf "$out/records_$chunk.tgz" --exclude=checkpoint --exclude='*.lock' --exclude=modules "$dir"
