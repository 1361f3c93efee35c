"""How much attention the prefix takes: per layer, the mean softmax mass on the prefix columns (all heads, all real
query tokens), and the norms of the prefix keys/values against the tokens' own, on a few dev examples.

Written to test one explanation of the STS-B collapse of prefix-containing runs (experiments/results/
low_resource_mpnet/README.md): that the prefix swallows the attention, so every token's output, [CLS] included,
becomes about the same mix of prefix values and the head can only predict the mean.

    python experiments/prefix_attention_mass.py --model mpnet --task stsb --data ../shared/data/glue
    python experiments/prefix_attention_mass.py --modules RUN_DIR/modules ...   (a trained run's saved modules)
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mpnet")
    p.add_argument("--method", default="prefix", help="a preset with a prefix, used when --modules is not given")
    p.add_argument("--modules", default=None, help="a saved module folder (config.json + weights.safetensors)")
    p.add_argument("--task", default="stsb")
    p.add_argument("--data", default="../shared/data/glue")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)

    import unipelt.sites as sites
    from unipelt import PeltModel, preset
    from unipelt.data import get_task
    from unipelt.data.glue import load_split
    from unipelt.encoders import load_encoder, load_tokenizer
    from unipelt.io import load_task

    spec = get_task(args.task)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    model = PeltModel(load_encoder(args.model))
    if args.modules:
        load_task(model, args.modules, name="probe")
    else:
        model.add_task("probe", preset(args.method), spec.num_labels)
    methods = model.tasks["probe"].methods
    if "prefix" not in methods:
        raise SystemExit(f"the run has no prefix (methods: {sorted(model.tasks['probe'].methods)})")
    P = methods["prefix"].config.length
    model.eval()
    rows = load_split(spec, "dev", args.data).select(range(args.examples))
    texts = [list(rows[f]) for f in spec.text_fields]
    batch = tokenizer(*texts, padding=True, truncation=True, max_length=128, return_tensors="pt")

    layers = []
    real = sites.F.scaled_dot_product_attention

    def probe(q, k, v, attn_mask=None, dropout_p=0.0, scale=None, **kw):
        scores = (q @ k.transpose(-1, -2)) * scale
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        mass = scores.softmax(-1)[..., :P].sum(-1)  # (B, H, T)
        real_tokens = batch["attention_mask"][:, None, :].bool().expand_as(mass)
        layers.append((mass[real_tokens].mean().item(), k[:, :, :P].norm(dim=-1).mean().item(),
                       k[:, :, P:].norm(dim=-1).mean().item(), v[:, :, :P].norm(dim=-1).mean().item(),
                       v[:, :, P:].norm(dim=-1).mean().item()))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, **kw)

    sites.F.scaled_dot_product_attention = probe
    try:
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    finally:
        sites.F.scaled_dot_product_attention = real
    what = args.modules or f"{args.method} at initialisation (seed {args.seed})"
    print(f"{args.model}, {what}, {args.task} dev, {args.examples} examples, prefix length {P}\n")
    print("| layer | attention mass on prefix | key norm prefix | key norm tokens | value norm prefix | value norm tokens |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i, (mass, kp, kt, vp, vt) in enumerate(layers):
        print(f"| {i} | {mass:.3f} | {kp:.1f} | {kt:.1f} | {vp:.1f} | {vt:.1f} |")


if __name__ == "__main__":
    main()
