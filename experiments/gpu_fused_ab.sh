#!/usr/bin/env bash
# Issue 12, fewer kernels per layer: the headline bench (BERT-base shape, bf16, batch 32, length 128) with the package
# of an earlier commit (.sweep/old) and with the working tree's, in one device call on the same card. Every compiled
# variant also counts torch.compile's graph breaks (a break costs inductor's fusions). Here, first:
#   mkdir -p .sweep/old && git archive OLD_COMMIT unipelt conf | tar -x -C .sweep/old
# then on the device (carry .whl .sweep/old; the wheels installed into /tmp/site, as experiments/prepare_device.sh
# says): bash experiments/gpu_fused_ab.sh     (JSON + Markdown per variant in $OUT)
set -u
out=${OUT:-ab_out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
B=(python3 -m unipelt.bench --fused-adam --models bert-base --dtypes bf16 --batches 32 --length 128 --steps 30)
# run from the package's own folder: `python -m` puts the current folder first on sys.path
bench() { (cd "$2" && timeout "$1" env PYTHONPATH="/tmp/site:$2" TORCH_LOGS=graph_breaks "${B[@]}" "${@:3}" 2>&1) \
  | grep -v -i warn | grep -E " train |failed|Error|Graph break" | sed -E 's/.*(Graph break).*/\1/' | uniq -c | tail -8; }
echo "== old ($(cat .sweep/old/COMMIT 2>/dev/null))"
bench 60 "$PWD/.sweep/old" --methods unipelt_apl --tag old-eager --out "$out/old_eager.json"
bench 130 "$PWD/.sweep/old" --compile --cuda-graph --methods unipelt_apl --tag old-compile-graph --out "$out/old_compile_graph.json"
echo "== new"
bench 60 "$PWD" --methods unipelt_apl,peft_lora --tag eager --out "$out/new_eager.json"
bench 300 "$PWD" --compile --cuda-graph --graph-peft --methods ${NEW_METHODS:-unipelt_apl,peft_lora,finetune,lora} --tag compile-graph \
  --out "$out/new_compile_graph.json"
