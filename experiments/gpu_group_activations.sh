#!/usr/bin/env bash
# Issue 10, group.activations=bf16 (unipelt/grouping/activations.py) on the device, in one call: the CUDA-only
# grouped tests, one group's epoch with the fp32 and the bf16 stream (profile_group_gpu.py: 12 runs, graphed steps,
# random MiniLM-shaped weights; RTE K=500 and SST-2 K=100), and every step's loss of 8 runs (eager, fp32 stream)
# with the package before (.sweep/old) and the working tree: the default path must not move. Here first:
#   mkdir -p .sweep/old && git archive OLD_COMMIT unipelt conf | tar -x -C .sweep/old && echo OLD_COMMIT > .sweep/old/COMMIT
# then on the device (carry .whl .sweep .dev/glue and the small files of .dev/minilm_parts; wheels in /tmp/site, as
# experiments/prepare_device.sh says): bash experiments/gpu_group_activations.sh   (Markdown + JSON in $OUT)
set -u
out=${OUT:-act_out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
PYTHONPATH="/tmp/site:$PWD" python3 -m pytest -q -p no:cacheprovider tests/test_group_activations.py \
  tests/test_group_graphs.py -k cuda 2>&1 | tail -4 | tee "$out/cuda_tests.txt"
P=(experiments/profile_group_gpu.py --model "${MODEL:-.dev/minilm_parts}" --random-weights --data .dev/glue)
for tk in rte:500 sst2:100; do
  PYTHONPATH="/tmp/site:$PWD" python3 "${P[@]}" --task "${tk%:*}" --k "${tk#*:}" --runs "${RUNS:-12}" --graph on \
    --activations fp32,bf16 --epochs 2 2>&1 | grep -v -i warn | tee "$out/epoch_${tk%:*}.md"
done
for pkg in old new; do
  dir=$PWD; [ "$pkg" = old ] && dir=$PWD/.sweep/old
  PYTHONPATH="/tmp/site:$dir" python3 "${P[@]}" --task rte --k 500 --runs 8 --graph off --epochs 1 \
    --losses "$out/losses_$pkg.json" > "$out/losses_$pkg.log" 2>&1
done
python3 experiments/compare_losses.py --label "fp32 stream, " "$out/losses_old.json" "$out/losses_new.json" | tee "$out/losses_compare.txt"
