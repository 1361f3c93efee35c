"""`unipelt-bench`: time a training step, inference and peak memory for every method on the same batches, in
one process, against HF peft's LoRA and prefix-tuning when peft is installed.

    unipelt-bench --models bert-base,minilm --dtypes fp32,bf16 --batches 16,32 --length 128 --steps 30
    unipelt-bench --length 128,rte,sst2 --cuda-graph --graph-bucket 16 ...   (real lengths: see task_batches)

Prints a Markdown table (median step time, ratio to peft LoRA, MFU) and writes JSON rows with --out.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from .inference import fold_for_inference
from .training.cuda_graph import GraphedForward, GraphedTrainStep, capturable_adamw

DEFAULT_METHODS = ["peft_lora", "peft_prefix", "finetune", "bitfit", "adapter", "prefix", "lora", "unipelt_ap",
                   "unipelt_apl"]
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def encoder_config(model: str):
    from transformers import AutoConfig, BertConfig

    if model == "bert-base":
        return BertConfig()  # 12 layers, hidden 768, 12 heads, FFN 3072: BERT-base shape, random weights
    if model == "minilm":
        from .encoders import model_dir

        try:
            path = model_dir("minilm")
        except ImportError:
            path = None
        if path is not None:
            return AutoConfig.from_pretrained(path)
        return BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    return AutoConfig.from_pretrained(model)


def flops_per_step(cfg, batch: int, length: int, trains_encoder: bool) -> float:
    """Matmul FLOPs: forward 2*N*tokens + attention 4*B*L*T^2*h; backward ~1x forward (input grads only) for
    a frozen encoder, ~2x for full fine-tuning."""
    h, layers, ffn = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    n_layer_params = layers * (4 * h * h + 2 * h * ffn)
    forward = 2 * n_layer_params * batch * length + 4 * batch * layers * length * length * h
    return forward * (3 if trains_encoder else 2)


def make_batches(vocab: int, batch: int, length: int, n: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, vocab - 1, (batch, length), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": torch.randint(0, 2, (batch,), generator=g).to(device)})
    return out


def task_batches(task: str, tokenizer, batch: int, n: int, device, data_dir=None, max_length: int = 128,
                 pad_multiple: int | None = None, seed: int = 0) -> list[dict]:
    """`n` batches of `batch` examples drawn (shuffled by `seed`) from a GLUE task's dev set, each padded to its own
    longest row (dynamic padding, as training pads), or up to the next multiple of `pad_multiple` (length buckets,
    one CUDA graph per width). Real lengths: a step at length 128 overstates the work of short-sentence tasks."""
    from .data import get_task
    from .data.glue import load_split
    from .training.batching import batches, encode

    spec = get_task(task)
    rows = load_split(spec, "dev", data_dir).shuffle(seed=seed)
    if len(rows) < batch * n:
        raise ValueError(f"{task} dev has {len(rows)} examples, fewer than {n} batches of {batch}")
    data = encode(rows.select(range(batch * n)), spec, tokenizer, max_length)
    out = []
    for b in batches(data, list(range(batch * n)), batch, tokenizer.pad_token_id,
                     pad_to=max_length if pad_multiple else None, pad_multiple=pad_multiple):
        labels = b["labels"] if spec.num_labels > 1 else torch.zeros(batch, dtype=torch.long)  # the bench's 2-way head
        out.append({"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device),
                    "labels": labels.to(device)})
    return out


def bench_batches(spec: str, cfg, model_name: str, batch: int, device, data_dir, pad_multiple,
                  tokenizer_name: str | None = None) -> list[dict]:
    """The batches of one `--length` entry: a number (random tokens, full length) or a GLUE task name."""
    if spec.isdigit():
        return make_batches(cfg.vocab_size, batch, int(spec), 4, device)
    from .data.glue import default_data_dir
    from .encoders import load_tokenizer

    data_dir = data_dir or default_data_dir()
    # bert-base has random weights and BERT's uncased vocabulary, which MiniLM's tokenizer has too
    tokenizer = load_tokenizer(tokenizer_name or ("minilm" if model_name == "bert-base" else model_name))
    return task_batches(spec, tokenizer, batch, 8, device, data_dir, pad_multiple=pad_multiple)


def compiled(model, compile_mode: str | None):
    """`model` under torch.compile in `compile_mode` (None: as it is). A fresh model per row: compile caches start
    empty, so the rows never hit the recompile limit."""
    if not compile_mode:
        return model
    torch._dynamo.reset()
    return torch.compile(model, mode=compile_mode)


def build_unipelt(base, method: str, device, compile_mode: str | None, frozen_dtype):
    from .config import preset
    from .model import PeltModel

    model = PeltModel(copy.deepcopy(base))
    model.add_task("bench", preset(method), 2)
    if frozen_dtype is not None and method != "finetune":
        model.encoder.to(frozen_dtype)
    model.to(device).train()
    params = list(model.trainable_named_parameters().values())
    forward = compiled(model, compile_mode)

    def step_fn(batch):
        return forward(**batch).loss

    def infer_fn(batch):
        return forward(batch["input_ids"], batch["attention_mask"]).logits

    return model, params, step_fn, infer_fn


def build_peft(base_cfg, method: str, device, compile_mode: str | None = None):
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    cfg_cls = copy.deepcopy(base_cfg)
    cfg_cls.num_labels = 2
    hf = AutoModelForSequenceClassification.from_config(cfg_cls)
    if method == "peft_lora":
        cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)
    else:
        cfg = PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=10, prefix_projection=True,
                                 encoder_hidden_size=512)
    model = get_peft_model(hf, cfg).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    forward = compiled(model, compile_mode)

    def step_fn(batch):
        return forward(**batch).loss

    def infer_fn(batch):
        return forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    return model, params, step_fn, infer_fn


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, batches, steps: int, warmup: int, device) -> list[float]:
    times = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        sync(device)
        t0 = time.perf_counter()
        fn(batch)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


PHASES = ("train", "infer")


def bench_one(name, build, batches, dtype, steps, warmup, device, fused_adam: bool, cuda_graph: bool = False,
              max_shapes: int = 1, phases=PHASES):
    """One row: the median train step and inference forward of `build()`'s model on `batches`. A phase left out of
    `phases` is not run (its time is None): an inference-only row compiles and captures only the forward."""
    gc.collect()  # the previous row's model must be gone before its memory is counted against this one
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, params, step_fn, infer_fn = build()
    trainable = sum(p.numel() for p in params)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=(dtype == "bf16"))
    if cuda_graph:  # forward + backward + AdamW captured once, replayed per step (see training/cuda_graph.py)
        optimizer = capturable_adamw(params, 1e-4, device=device)
        train_step = GraphedTrainStep(step_fn, optimizer, device, torch.bfloat16 if dtype == "bf16" else None,
                                      max_shapes=max_shapes)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused_adam if device.type == "cuda" else None)

        def train_step(batch):
            with amp:
                loss = step_fn(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    train = time_calls(train_step, batches, steps, warmup, device) if "train" in phases else []
    model.eval()
    if cuda_graph:  # the deployment path (unipelt.inference): prefix folded, one graph per batch shape
        if hasattr(model, "active"):  # a unipelt model (peft models have no folding)
            fold_for_inference(model)
        infer = GraphedForward(infer_fn, device, torch.bfloat16 if dtype == "bf16" else None, max_shapes=max_shapes)
    else:
        @torch.no_grad()
        def infer(batch):
            with amp:
                infer_fn(batch)

    inference = time_calls(infer, batches, steps, warmup, device) if "infer" in phases else []
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"method": name, "trainable": trainable, "train_step_ms": _median_ms(train),
            "train_step_ms_p10": 1e3 * sorted(train)[len(train) // 10] if train else None,
            "infer_ms": _median_ms(inference), "peak_mem_mb": peak}


def _median_ms(times: list[float]) -> float | None:
    return 1e3 * statistics.median(times) if times else None


def run(args, on_row=None) -> list[dict]:
    """Bench every (model, dtype, batch, length, method) row; `on_row(rows)` after each (main saves there, so a
    bench cut short by a time limit keeps the rows it finished)."""
    from transformers import AutoModel

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = False
    methods = args.methods.split(",")
    try:
        import peft  # noqa: F401
    except ImportError:
        print("peft not installed: skipping the peft reference rows", file=sys.stderr)
        methods = [m for m in methods if not m.startswith("peft_")]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in BF16_PEAK_FLOPS.items() if k in gpu), None)
    rows = []
    for model_name in args.models.split(","):
        cfg = encoder_config(model_name)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        base = AutoModel.from_config(cfg)
        for dtype in args.dtypes.split(","):
            for batch, length in [(int(b), n) for b in args.batches.split(",") for n in str(args.length).split(",")]:
                batches = bench_batches(length, cfg, model_name, batch, device, args.data, args.graph_bucket,
                                        args.tokenizer)
                widths = [b["input_ids"].shape[1] for b in batches]
                for method in methods:
                    # --cuda-graph and --compile apply to the peft rows only with --graph-peft (then the same way)
                    treated = args.graph_peft or not method.startswith("peft_")
                    graphed, compiled = args.cuda_graph and treated, bool(args.compile) and treated
                    if method.startswith("peft_"):
                        build = lambda m=method, c=args.compile if treated else None: build_peft(  # noqa: E731
                            cfg, m, device, c)
                    else:
                        frozen = torch.bfloat16 if (dtype == "bf16" and args.frozen_bf16) else None
                        build = lambda m=method, f=frozen: build_unipelt(base, m, device, args.compile, f)  # noqa: E731
                    try:
                        row = bench_one(method, build, batches, dtype, args.steps, args.warmup, device, args.fused_adam,
                                        graphed, max_shapes=len(set(widths)) + 1, phases=args.phases.split(","))
                    except Exception as err:  # one broken row must not lose the others
                        print(f"{model_name} {dtype} b{batch} {method}: failed: {err!r}", file=sys.stderr)
                        continue
                    flops = statistics.mean(flops_per_step(cfg, batch, w, method == "finetune") for w in widths)
                    row.update(variant=args.tag or "eager", graphed=graphed, compiled=compiled, model=model_name,
                               dtype=dtype, batch=batch,
                               length=int(length) if length.isdigit() else length, mean_width=statistics.mean(widths),
                               widths=sorted(set(widths)), device=gpu,
                               tflops=flops / 1e12,
                               mfu=(flops / (row["train_step_ms"] / 1e3) / peak) if peak and row["train_step_ms"] else None,
                               percent=100 * row["trainable"] / sum(p.numel() for p in base.parameters()))
                    rows.append(row)
                    if on_row is not None:
                        on_row(rows)
                    print(f"{model_name:9s} {dtype:4s} b{batch:<3d} {length:>5s} {method:12s} train {_ms(row['train_step_ms'], 8)} ms  "
                          f"infer {_ms(row['infer_ms'], 7)} ms  mem {row['peak_mem_mb']:8.0f} MiB", flush=True)
    return rows


def _ms(value: float | None, width: int = 0) -> str:
    """A time in ms for the tables, '-' for a phase not run."""
    return f"{value:{width}.2f}" if value is not None else "-".rjust(width)


def render(rows: list[dict], reference: str = "peft_lora") -> str:
    lines = ["| model | dtype | batch | length | method | variant | trainable | train step ms | x peft LoRA | MFU (bf16 peak) "
             "| infer ms | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def key(r):
        return r["model"], r["dtype"], r["batch"], r.get("length")

    refs = {key(r): r for r in rows if r["method"] == reference}
    for r in rows:
        ref = refs.get(key(r))
        ratio = f"{r['train_step_ms'] / ref['train_step_ms']:.2f}" if ref and r["train_step_ms"] and ref["train_step_ms"] else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        length = r.get("length", "-")
        if isinstance(length, str):
            length = f"{length} (mean {r['mean_width']:.0f})"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {length} | {r['method']} | {r.get('variant', 'eager')} | {r['trainable']:,} | "
                     f"{_ms(r['train_step_ms'])} | {ratio} | {mfu} | {_ms(r['infer_ms'])} | {r['peak_mem_mb']:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="unipelt-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bert-base,minilm", help="bert-base (random weights), minilm, or a model path")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    p.add_argument("--batches", default="16,32")
    p.add_argument("--length", default="128",
                   help="comma list of sequence lengths (random tokens, full length) and/or GLUE task names (batches "
                        "of that task's dev set, dynamic padding: real lengths), e.g. 128,rte,sst2")
    p.add_argument("--data", default=None, help="GLUE folder for task lengths (default: the project's data folder)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer for task lengths (default: the model's; MiniLM's for bert-base), e.g. .dev/minilm")
    p.add_argument("--graph-bucket", type=int, default=None,
                   help="pad task batches up to the next multiple of this many tokens (one CUDA graph per width)")
    p.add_argument("--steps", type=int, default=30, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   help="torch.compile the unipelt models (optionally a mode: default, reduce-overhead, max-autotune)")
    p.add_argument("--tag", default="", help="label for this variant (column in the table)")
    p.add_argument("--phases", default="train,infer",
                   help="what to time: train and/or infer (infer alone compiles and captures only the forward)")
    p.add_argument("--frozen-bf16", action="store_true", help="keep the frozen encoder's weights in bf16 for bf16 rows")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each unipelt train step (forward, backward, AdamW) as one CUDA graph; peft rows stay "
                        "eager unless --graph-peft")
    p.add_argument("--graph-peft", action="store_true", help="with --cuda-graph: capture the peft rows' steps too")
    p.add_argument("--fused-adam", action="store_true", help="fused AdamW on CUDA (unipelt and peft alike)")
    p.add_argument("--out", default=None, help="write rows as JSON here (and the table next to it as .md)")
    args = p.parse_args(argv)
    if args.graph_bucket is not None and args.graph_bucket < 1:
        p.error(f"--graph-bucket must be a positive number of tokens, got {args.graph_bucket}")
    for length in str(args.length).split(","):
        if not length.isdigit():
            from .data import get_task

            try:
                get_task(length)
            except (KeyError, ValueError) as err:
                p.error(f"--length {length!r} is neither a number of tokens nor a GLUE task ({err})")
    phases = args.phases.split(",")
    if not phases or any(ph not in PHASES for ph in phases):
        p.error(f"--phases {args.phases!r}: give train and/or infer, comma-separated")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "unipelt-bench " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = run(args, on_row=(lambda done: save(done, args.out, command)) if args.out else None)
    print()
    print(render(rows))
    return 0


def save(rows: list[dict], path: str, command: str) -> None:
    """The rows as JSON and their table as Markdown next to it (rewritten after every row)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "torch": torch.__version__, "device": rows[0]["device"] if rows else None}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(f"`{meta['command']}` on {meta['device']} (torch {meta['torch']})\n\n"
                                      f"{render(rows)}\n")


if __name__ == "__main__":
    sys.exit(main())
