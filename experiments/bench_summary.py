"""The CUDA-graph issue's headline figures from `unipelt-bench --out` files: experiments/results/bench/summary.json.

    python experiments/bench_summary.py ROWS.json [ROWS.json ...] --out experiments/results/bench/summary.json

Reads BERT-base-shape rows at bf16, batch 32, length 128 (one device: refuses a mix) and picks each figure in its
fastest mode: unipelt_apl's train step and inference (eager, graphed or compiled + graphed, whichever is fastest),
peft LoRA's eager train step and its fastest graphed one (compiled too where the rows have it: the same way as
APL), full fine-tuning's inference in its fastest mode. MFU is the fastest APL step's, counted as
the bench counts it (`unipelt.bench.flops_per_step`: the encoder's matmul FLOPs, forward + input gradients for a
frozen encoder, over the bf16 dense peak). Prints the targets next to the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGETS = {"apl_vs_lora_graphed": 1.3, "apl_vs_lora_eager": 0.5, "apl_infer_vs_finetune": 1.3, "apl_mfu": 0.30}


def headline_rows(paths: list[str], model: str = "bert-base", batch: int = 32, length: int = 128) -> list[dict]:
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        rows += data["rows"] if isinstance(data, dict) else data  # unipelt-bench writes {"rows": [...], ...}
    return [r for r in rows if r.get("model") == model and r.get("dtype") == "bf16" and r.get("batch") == batch
            and r.get("length") == length]


def _fastest(rows: list[dict], method: str, key: str, graphed: bool | None = None) -> dict:
    """The fastest `method` row; graphed=False: as it runs (neither graphed nor compiled), True: graphed, compiled
    or not (the reference gets its best graphed mode, as unipelt_apl does)."""
    found = [r for r in rows if r["method"] == method and r.get(key) is not None  # a phase not run (--phases)
             and (graphed is None or bool(r.get("graphed")) == graphed)
             and not (graphed is False and r.get("compiled"))]
    if not found:
        mode = "" if graphed is None else (" graphed" if graphed else " eager")
        raise SystemExit(f"bench_summary: no{mode} {method} row at bf16, batch 32, length 128 in the files given")
    return min(found, key=lambda r: r[key])


def _mode(row: dict) -> str:
    modes = [name for name in ("compiled", "graphed") if row.get(name)]
    return "+".join(modes) or "eager"


def summarize(rows: list[dict]) -> dict:
    devices = sorted({r["device"] for r in rows})
    if len(devices) != 1:
        raise SystemExit(f"bench_summary: the rows come from {len(devices)} devices {devices}; give one device's files")
    apl_train = _fastest(rows, "unipelt_apl", "train_step_ms")
    apl_infer = _fastest(rows, "unipelt_apl", "infer_ms")
    lora_eager = _fastest(rows, "peft_lora", "train_step_ms", graphed=False)
    lora_graphed = _fastest(rows, "peft_lora", "train_step_ms", graphed=True)
    ft_infer = _fastest(rows, "finetune", "infer_ms")
    out = {"apl_train_ms": round(apl_train["train_step_ms"], 3),
           "peft_lora_eager_ms": round(lora_eager["train_step_ms"], 3),
           "peft_lora_graphed_ms": round(lora_graphed["train_step_ms"], 3),
           "apl_infer_ms": round(apl_infer["infer_ms"], 3), "finetune_infer_ms": round(ft_infer["infer_ms"], 3),
           "apl_mfu": round(apl_train["mfu"], 4) if apl_train.get("mfu") is not None else None,
           "device": devices[0]}
    out["modes"] = {"apl_train": _mode(apl_train), "apl_infer": _mode(apl_infer), "finetune_infer": _mode(ft_infer),
                    "peft_lora_graphed": _mode(lora_graphed)}
    out["ratios"] = {"apl_vs_lora_graphed": round(out["apl_train_ms"] / out["peft_lora_graphed_ms"], 3),
                     "apl_vs_lora_eager": round(out["apl_train_ms"] / out["peft_lora_eager_ms"], 3),
                     "apl_infer_vs_finetune": round(out["apl_infer_ms"] / out["finetune_infer_ms"], 3)}
    met = {name: out["ratios"][name] <= bound for name, bound in TARGETS.items() if name in out["ratios"]}
    met["apl_mfu"] = out["apl_mfu"] is not None and out["apl_mfu"] >= TARGETS["apl_mfu"]
    out["targets_met"] = met
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", nargs="+", help="JSON files written by unipelt-bench --out")
    p.add_argument("--out", default=None, help="write the summary here (JSON)")
    p.add_argument("--command", default=None, help="the command that produced the rows, kept in the summary")
    args = p.parse_args(argv)
    summary = summarize(headline_rows(args.rows))
    if args.command:
        summary["command"] = args.command
    text = json.dumps(summary, indent=1)
    print(text)
    for name, ok in summary["targets_met"].items():
        value = summary["apl_mfu"] if name == "apl_mfu" else summary["ratios"][name]
        bound = (">= " if name == "apl_mfu" else "<= ") + str(TARGETS[name])
        print(f"{name:24s} {value:8.3f}  target {bound:7s} {'met' if ok else 'NOT met'}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
