"""GPU check of MPNet after `mpnet_to_device.py assemble` (run on the device from the repo root, PYTHONPATH=$PWD):
the real bf16 weights in .dev/mpnet with unipelt_aplb (adapter, prefix with MPNet's relative bias, LoRA, BitFit,
gates): CUDA fp32 logits against CPU, then bf16-autocast AdamW steps (time, peak memory). Not yet run on a GPU."""
import sys
import time

import torch

if not torch.cuda.is_available():
    sys.exit("needs a CUDA GPU")
from unipelt import PeltModel, load_encoder, load_tokenizer, preset
tok = load_tokenizer(".dev/mpnet")
enc = tok(["a gripping, funny film", "the plot never comes together and the jokes fall flat"] * 16, padding="max_length",
          max_length=128, truncation=True, return_tensors="pt")
ids, mask = enc["input_ids"], enc["attention_mask"]
labels = torch.arange(32) % 2

def build(cfg, device):
    m = PeltModel(load_encoder(".dev/mpnet"))
    torch.manual_seed(0)
    m.add_task("t", preset(cfg), 2)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in m.tasks["t"].parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.02)
    return m.to(device).eval()

cpu = build("unipelt_aplb", "cpu")
gpu = build("unipelt_aplb", "cuda")
with torch.no_grad():
    a = cpu(ids[:4], mask[:4]).logits
    b = gpu(ids[:4].cuda(), mask[:4].cuda()).logits.cpu()
print("fp32 cuda vs cpu max diff", (a - b).abs().max().item())
gpu.train()
opt = torch.optim.AdamW(gpu.trainable_named_parameters().values(), lr=1e-4)
ids, mask, labels = ids.cuda(), mask.cuda(), labels.cuda()
for dtype in (torch.bfloat16,):
    times = []
    for step in range(12):
        torch.cuda.synchronize(); t = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype):
            loss = gpu(ids, mask, labels=labels).loss
        loss.backward(); opt.step(); opt.zero_grad()
        torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    print(dtype, "loss", loss.item(), "step ms (median of last 10)", sorted(times[2:])[5] * 1e3)
print("peak GB", torch.cuda.max_memory_allocated() / 1e9)
