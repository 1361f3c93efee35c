#!/usr/bin/env bash
# Issue 12 on one GPU (device tool): the CUDA correctness tests (captured graphs per bucket width, compiled too),
# then the training step at real lengths: batches of RTE and SST-2 dev (dynamic padding) and fixed length 128,
# eager against one CUDA graph per 16-token bucket, and the compiled model inside those graphs (what
# train.compile=true + train.cuda_graph does in a run). BERT-base shape (random weights), bf16, batch 32.
# Needs a tokenizer folder and the GLUE files: carry .dev/glue and the MiniLM tokenizer files
# (.dev/minilm_parts/{config,special_tokens_map,tokenizer,tokenizer_config}.json + vocab.txt; no weights).
#   TOKENIZER=.dev/minilm_parts bash experiments/gpu_real_lengths.sh      (JSON + Markdown per variant in $OUT)
set -u
out=${OUT:-bench_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py tests/test_inference.py -k on_cuda \
  2>&1 | tail -4
B=(python3 -m unipelt.bench --fused-adam --models bert-base --dtypes bf16 --batches 32 --length 128,rte,sst2
   --data .dev/glue --tokenizer "${TOKENIZER:-.dev/minilm}" --steps 20)
run() { timeout "$1" "${B[@]}" "${@:2}" 2>&1 | grep -v -i warn | grep -E "train|failed|Error" | tail -20; }
run 120 --tag eager --methods peft_lora,lora,unipelt_apl --out "$out/real_eager.json"
run 120 --cuda-graph --graph-bucket 16 --tag graph-bucket16 --methods lora,unipelt_apl --out "$out/real_graph.json"
run "${COMPILE_S:-300}" --compile --cuda-graph --graph-bucket 16 --tag compile-graph-bucket16 \
  --methods unipelt_apl,lora --out "$out/real_compile_graph.json"
