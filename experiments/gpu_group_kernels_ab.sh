#!/usr/bin/env bash
# Issue 10, the grouped step's lean dropout kernels, in one device call: the kernels bit for bit and timed
# (gpu_group_kernels.py), then one group's epoch (profile_group_gpu.py: 12 runs of RTE K=500, graphed steps, random
# MiniLM-shaped weights) with the package before (.sweep/old) and the working tree's, and every step's loss of both
# (8 runs, eager steps), compared. Here first:
#   mkdir -p .sweep/old && git archive OLD_COMMIT unipelt conf | tar -x -C .sweep/old
# then on the device (carry .whl .sweep .dev/glue and the small files of .dev/minilm_parts; wheels in /tmp/site, as
# experiments/prepare_device.sh says): bash experiments/gpu_group_kernels_ab.sh   (Markdown + JSON in $OUT)
set -u
out=${OUT:-ab_out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
PYTHONPATH="/tmp/site:$PWD" python3 experiments/gpu_group_kernels.py | tee "$out/kernels.md"
P=(experiments/profile_group_gpu.py --model "${MODEL:-.dev/minilm_parts}" --random-weights --data .dev/glue
   --task "${TASK:-rte}" --k 500)
for pkg in old new; do
  dir=$PWD; [ "$pkg" = old ] && dir=$PWD/.sweep/old
  echo "== $pkg ($(cat "$dir/COMMIT" 2>/dev/null || echo working tree))" | tee "$out/epoch_$pkg.md"
  PYTHONPATH="/tmp/site:$dir" python3 "${P[@]}" --runs "${RUNS:-12}" --graph on --epochs 2 2>&1 \
    | grep -v -i warn | tee -a "$out/epoch_$pkg.md"
  PYTHONPATH="/tmp/site:$dir" python3 "${P[@]}" --runs 8 --graph off --epochs 1 --losses "$out/losses_$pkg.json" \
    > "$out/losses_$pkg.log" 2>&1
done
python3 experiments/compare_losses.py "$out/losses_old.json" "$out/losses_new.json" | tee "$out/losses_compare.txt"
