#!/usr/bin/env bash
# Before/after on one GPU, in one device call: the grouped epoch profile (experiments/profile_group_gpu.py: train
# and dev-eval ms per epoch, GPU busy, kernels per epoch) with the package of an earlier commit and with the working
# tree's, back to back on the same card. Here, first:
#   mkdir -p .sweep/old && git archive OLD_COMMIT unipelt conf | tar -x -C .sweep/old
# then on the device (carry .whl .dev/glue .sweep/old; MiniLM in two parts first, as experiments/prepare_device.sh says):
#   RUNS=8,32 K=100 bash experiments/gpu_code_ab.sh
set -u
out=${OUT:-ab_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
for tree in old new; do
  code=$PWD; [ "$tree" = old ] && code=$PWD/.sweep/old
  PYTHONPATH=/tmp/site:$code python3 experiments/profile_group_gpu.py --runs "${RUNS:-8,32}" --k "${K:-100}" \
    --task "${TASK:-sst2}" --epochs 2 ${TOP:+--top} > "$out/profile_$tree.md" 2>&1
  echo "== $tree ($code)"; grep "^|\|^NVIDIA" "$out/profile_$tree.md"
done
