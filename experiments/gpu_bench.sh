#!/usr/bin/env bash
# The GPU benchmark behind experiments/results/bench/: the full eager table, then torch.compile variants of the
# headline comparison (BERT-base shape, bf16, batch 32). Writes JSON + Markdown per variant into ${OUT:-bench_out}.
set -u
out=${OUT:-bench_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
python3 -m unipelt.bench --models bert-base,minilm --dtypes fp32,bf16 --batches 16,32 --fused-adam --tag eager \
  --out "$out/eager.json" 2>&1 | grep -v -i warn | tail -80
python3 -m unipelt.bench --models bert-base --dtypes bf16 --batches 32 --fused-adam --compile --tag compiled \
  --methods peft_lora,lora,prefix,adapter,unipelt_apl --out "$out/compiled.json" 2>&1 | grep -v -i warn | tail -8
python3 -m unipelt.bench --models bert-base --dtypes bf16 --batches 32 --fused-adam --compile --frozen-bf16 \
  --tag compiled+bf16-encoder --methods peft_lora,lora,unipelt_apl --out "$out/compiled_bf16enc.json" 2>&1 | grep -v -i warn | tail -5
