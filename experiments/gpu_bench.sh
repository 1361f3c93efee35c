#!/usr/bin/env bash
# The GPU benchmark behind experiments/results/bench/ (whole-step CUDA graphs): the CUDA correctness tests, the
# headline comparison (BERT-base shape, bf16, batch 32) with unipelt's steps captured as CUDA graphs against
# eager peft, the same with peft captured too, then the grid over both models and dtypes at batch 32.
# Writes JSON + Markdown per variant into ${OUT:-bench_out}.
set -u
out=${OUT:-bench_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py 2>&1 | tail -3
bench() { python3 -m unipelt.bench --fused-adam "$@" 2>&1 | grep -v -i warn | grep -E "train|failed|Error" | tail -40; }
bench --models bert-base --dtypes bf16 --batches 32 --cuda-graph --tag cuda-graph --out "$out/graph.json" \
  --methods peft_lora,peft_prefix,finetune,bitfit,adapter,prefix,lora,unipelt_ap,unipelt_apl
bench --models bert-base --dtypes bf16 --batches 32 --cuda-graph --graph-peft --tag cuda-graph-peft-too \
  --methods peft_lora,peft_prefix,lora,prefix,unipelt_apl --out "$out/graph_peft.json"
# real lengths (issue 12): batches of RTE and SST-2 dev (dynamic padding), eager against graphs per 16-token bucket
bench --models bert-base --dtypes bf16 --batches 32 --length 128,rte,sst2 --data .dev/glue --tokenizer .dev/minilm \
  --tag eager --methods peft_lora,lora,unipelt_apl --out "$out/real_eager.json"
bench --models bert-base --dtypes bf16 --batches 32 --length 128,rte,sst2 --data .dev/glue --tokenizer .dev/minilm \
  --cuda-graph --graph-bucket 16 --tag graph-bucket16 --methods lora,unipelt_apl --out "$out/real_graph.json"
timeout ${GRID_S:-200} python3 -m unipelt.bench --fused-adam --models bert-base,minilm --dtypes fp32,bf16 --batches 32 \
  --cuda-graph --steps 20 --tag cuda-graph --out "$out/graph_grid.json" 2>&1 | grep -E "failed|Error" | tail -5
