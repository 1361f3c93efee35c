"""One row of experiments/results/bench/sweep_throughput.json from a sweep's runs folder (used by the gpu_*.sh
scripts): completed records over the wall time, plus the mean GPU busy % of an nvidia-smi log when given.

    python3 experiments/throughput_row.py RUNS_DIR T0 T1 --k 100 --mode grouped --gpus 1 --device NAME [--util FILE] [--note TEXT]
"""
import argparse
import glob
import json

p = argparse.ArgumentParser()
p.add_argument("runs_dir")
p.add_argument("t0", type=float)
p.add_argument("t1", type=float)
p.add_argument("--k", type=int, required=True)
p.add_argument("--mode", required=True)
p.add_argument("--gpus", type=int, default=1)
p.add_argument("--device", required=True)
p.add_argument("--util", default=None)
p.add_argument("--note", default=None)
a = p.parse_args()
n = sum(json.load(open(f)).get("status") == "complete" for f in glob.glob(f"{a.runs_dir}/*/record.json"))
wall = a.t1 - a.t0
row = {"k": a.k, "mode": a.mode, "gpus": a.gpus, "runs": n, "wall_s": round(wall, 1),
       "runs_per_hour": round(3600 * n / wall), "device": a.device}
if a.util:
    # nvidia-smi -l 1 lines: "busy" or "index, busy, memory"; the mean over every GPU's samples
    per_gpu: dict[str, list[float]] = {}
    for line in open(a.util):
        fields = [f.strip() for f in line.split(",")]
        busy = fields[1] if len(fields) >= 2 else fields[0]
        if busy.replace(".", "").isdigit():
            per_gpu.setdefault(fields[0] if len(fields) >= 2 else "0", []).append(float(busy))
    u = [x for xs in per_gpu.values() for x in xs]
    row["gpu_busy_mean_pct"] = round(sum(u) / max(len(u), 1), 1)
    if len(per_gpu) > 1:
        row["gpu_busy_pct_per_gpu"] = {g: round(sum(xs) / len(xs), 1) for g, xs in sorted(per_gpu.items())}
if a.note:
    row["note"] = a.note
print(json.dumps(row))
