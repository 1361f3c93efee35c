"""The ready sweeps under experiments/: every experiment config composes, sweeps the axes it promises, and passes
the runner's validation; the smoke sweep runs end to end on CPU (experiments/smoke.sh: sweep -> records -> report)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from unipelt.confdir import CONF_DIR
from unipelt.run import plan

ROOT = Path(__file__).resolve().parents[1]
ALL_TASKS = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]
LOCAL_TASKS = ["cola", "sst2", "mrpc", "stsb", "rte"]  # tasks with a local train file (the rest need data.dir=hub)
PAPER_METHODS = ["finetune", "bitfit", "adapter", "houlsby", "prefix", "lora", "unipelt_ap", "unipelt_apl",
                 "unipelt_aplb", "unipelt_ap_nogate", "unipelt_apl_nogate", "unipelt_aplb_nogate"]
PAPER_SEEDS = ["111", "222", "333", "444", "555"]
SMOKE_METHODS = ["finetune", "bitfit", "adapter", "prefix", "lora", "unipelt_apl", "unipelt_apl_nogate"]

# experiment -> (swept axes, fixed settings checked on the composed config, runs_dir, expected seeds of its script)
EXPERIMENTS = {
    "smoke": ({"task": ["rte", "stsb"], "method": SMOKE_METHODS, "data.k": ["16", "32"], "data.seed": ["111", "222"]},
              {"model.num_layers": 2, "data.max_length": 64, "data.dev_size": 32, "train.epochs": 3,
               "train.eval_batch_size": 64, "output.save_modules": False},
              "experiments/results/smoke/runs", 2),
    "low_resource": ({"task": ALL_TASKS, "data.k": ["100", "500", "1000"], "data.seed": PAPER_SEEDS,
                      "method": PAPER_METHODS},
                     {"data.dev_size": 1000, "train.epochs": 50, "train.patience": 10, "output.save_modules": False},
                     "runs/low_resource", 5),
    "full_data": ({"task": ALL_TASKS, "data.seed": PAPER_SEEDS, "method": PAPER_METHODS},
                  {"data.k": "full", "output.save_modules": False},
                  "runs/full_data", None),
    "efficiency": ({"method": PAPER_METHODS[:9]},
                   {"task.name": "sst2", "data.k": 1000, "data.seed": 111, "output.save_modules": False},
                   "runs/efficiency", 1),
}


def compose_experiment(name: str, *overrides: str, hydra: bool = False):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *overrides], return_hydra_config=hydra)


def sweep_axes(cfg) -> dict[str, list[str]]:
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    return {key: [v.strip() for v in str(value).split(",")] for key, value in params.items()}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_config_composes_and_sweeps_the_promised_axes(name):
    axes, fixed, runs_dir, _ = EXPERIMENTS[name]
    cfg = compose_experiment(name, hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    got = sweep_axes(cfg)
    assert set(got) == set(axes), f"{name} sweeps {sorted(got)}"
    for key, values in axes.items():
        assert sorted(got[key]) == sorted(values), f"{name}: {key}"
        assert len(set(got[key])) == len(got[key]), f"{name}: duplicate values of {key}"
    for key, value in fixed.items():
        assert OmegaConf.select(cfg, key) == value, f"{name}: {key}"
    assert cfg.output.runs_dir == runs_dir
    # Hydra's logs must not land in the runs folder (the committed smoke runs hold records only)
    for mode in ("run", "sweep"):
        hydra_dir = str(cfg.hydra[mode].dir)
        assert hydra_dir.startswith("outputs/"), f"{name}: hydra.{mode}.dir={hydra_dir}"


def test_sweep_sizes_match_the_documented_counts():
    sizes = {}
    for name in EXPERIMENTS:
        n = 1
        for values in sweep_axes(compose_experiment(name, hydra=True)).values():
            n *= len(values)
        sizes[name] = n
    assert sizes == {"smoke": 56, "low_resource": 1440, "full_data": 480, "efficiency": 9}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_swept_value_passes_the_runners_validation(name):
    """Each value of each axis (others at their first value) composes and passes `plan` (settings validation,
    without data or model): a typo in a method name or an unknown key fails here, not hours into a sweep."""
    axes, *_ = EXPERIMENTS[name]
    first = {key: values[0] for key, values in axes.items()}
    for key, values in axes.items():
        for value in values:
            point = {**first, key: value}
            extra = [] if point.get("task", "rte") in LOCAL_TASKS else ["data.dir=hub"]
            cfg = compose_experiment(name, *[f"{k}={v}" for k, v in point.items()], *extra)
            p = plan(cfg)
            if "method" in point:
                assert p.method == point["method"]
            if "data.k" in point:
                assert str(p.k) == point["data.k"]


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_script_runs_its_sweep_then_the_report(name):
    script = ROOT / "experiments" / f"{name}.sh"
    text = script.read_text()
    assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
    assert "set -euo pipefail" in text
    sweep = re.search(rf'^\s*unipelt experiment={name} .*output\.runs_dir="\$runs" "\$@"$', text, re.M)
    assert sweep, f"{script} must run `unipelt experiment={name} ... output.runs_dir=\"$runs\" \"$@\"`"
    sweep_at = sweep.start()
    report_at = text.index('unipelt-report "$runs" --out "$report"')
    assert sweep_at < report_at
    runs_dir, seeds = EXPERIMENTS[name][2], EXPERIMENTS[name][3]
    assert f"RUNS_DIR:-{runs_dir}" in text
    if seeds is not None:
        assert f"--expected-seeds {seeds}" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_efficiency_script_renders_saved_benchmark_rows(tmp_path):
    rows = [{"method": m, "model": "minilm", "dtype": "fp32", "batch": 16, "length": 128, "trainable": t,
             "percent": p, "train_step_ms": s, "infer_ms": 1.0, "peak_mem_mb": 100.0}
            for m, t, p, s in [("peft_lora", 1000, 0.1, 10.0), ("lora", 3000, 0.3, 20.0)]]
    src = tmp_path / "bench.json"
    src.write_text(json.dumps({"meta": {"command": "unipelt-bench --models minilm", "device": "cpu",
                                        "torch": "x"}, "rows": rows}))
    out = subprocess.run(["bash", str(ROOT / "experiments" / "efficiency.sh"), "--render", str(src),
                          str(tmp_path / "eff.md")], capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    md = (tmp_path / "eff.md").read_text()
    assert "`unipelt-bench --models minilm` on cpu" in md
    assert "(2.00×)" in md  # lora's step time relative to peft_lora
    assert "relative to peft_lora" in md


def _env() -> dict[str, str]:
    """The test's interpreter's bin folder first on PATH, so the scripts find `unipelt` and `unipelt-report`."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error"}


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def report_files(tasks: list[str], gated_tasks: list[str]) -> list[str]:
    files = [f"{stem}.{fmt}" for stem in ("main_table", "headline", "ablation") for fmt in ("md", "tex", "csv")]
    files += ["efficiency.md", "efficiency.csv", "failed_runs.md", "failed_runs.csv", "skipped.csv",
              "aggregate.json", "aggregate.parquet", "score_vs_k.png", "score_vs_k.pdf"]
    files += [f"score_vs_k_{t}.{fmt}" for t in tasks for fmt in ("png", "pdf")]
    files += [f"gates_{t}.{fmt}" for t in gated_tasks for fmt in ("png", "pdf")]
    return files


@pytest.mark.slow
def test_smoke_sweep_end_to_end_on_cpu_writes_every_report_file(tmp_path):
    """experiments/smoke.sh, shrunk further (1 layer, 1 epoch, 2 methods, 1 task), must leave one complete record
    per run, no clutter in the runs folder, and every report file, each consistent with the runs made."""
    runs, report = tmp_path / "runs", tmp_path / "report"
    methods, ks, seeds, task = ["lora", "unipelt_apl"], [8, 16], [111, 222], "rte"
    overrides = [f"task={task}", f"method={','.join(methods)}", f"data.k={','.join(map(str, ks))}",
                 f"data.seed={','.join(map(str, seeds))}", "model.num_layers=1", "data.dev_size=16",
                 "data.max_length=32", "train.epochs=1", f"hydra.sweep.dir={tmp_path / 'hydra'}"]
    out = subprocess.run(["bash", str(ROOT / "experiments" / "smoke.sh"), *overrides], capture_output=True,
                         text=True, timeout=240, env={**_env(), "RUNS_DIR": str(runs), "REPORT_DIR": str(report)})
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])

    # records: one complete record per (method, K, seed), only records and logs in the run folders
    records = [json.loads(p.read_text()) for p in runs.glob("*/record.json")]
    assert len(records) == len(methods) * len(ks) * len(seeds)
    assert all(r["status"] == "complete" and r["task"] == task for r in records)
    assert {(r["method"], r["k"], r["data_seed"]) for r in records} == \
        {(m, k, s) for m in methods for k in ks for s in seeds}
    assert all(r["config"]["model"]["num_layers"] == 1 and r["config"]["train"]["epochs"] == 1 for r in records)
    leftovers = {p.name for p in runs.rglob("*") if p.is_file()} - {"record.json", "log.csv"}
    assert not leftovers and not (runs / "_hydra").exists()

    # report: every file, non-empty
    missing = [f for f in report_files([task], [task]) if not _nonempty(report / f)]
    assert not missing, f"missing or empty report files: {missing}"
    for png in report.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for pdf in report.glob("*.pdf"):
        assert pdf.read_bytes()[:5] == b"%PDF-"

    # main table: one row per (task, method, K) group, each over all seeds, mean/std from the records
    main = pd.read_csv(report / "main_table.csv")
    assert len(main) == len(methods) * len(ks)
    assert sorted(zip(main["method"], main["k"].astype(int))) == sorted((m, k) for m in methods for k in ks)
    assert (main["n"] == len(seeds)).all() and not main["flagged"].any()  # --expected-seeds 2 in smoke.sh
    for row in main.itertuples():
        scores = pd.Series([r["test_score"] for r in records if r["method"] == row.method and r["k"] == row.k])
        assert row.mean == pytest.approx(scores.mean()) and row.std == pytest.approx(scores.std(ddof=1))
    md = (report / "main_table.md").read_text()
    assert all(m in md for m in methods) and all(f"K = {k}" in md for k in ks)  # one block per K

    agg = json.loads((report / "aggregate.json").read_text())
    assert len(agg) == len(main)
    assert len(pd.read_parquet(report / "aggregate.parquet")) == len(main)
    headline = pd.read_csv(report / "headline.csv")
    assert set(headline.loc[headline["row"] == "gated", "method"]) == {"unipelt_apl"}
    assert set(headline.loc[headline["row"] == "best_single", "method"]) == {"lora"}
    efficiency = pd.read_csv(report / "efficiency.csv")
    assert sorted(efficiency["method"]) == sorted(methods)
    assert (efficiency["trainable"] > 0).all()
    assert pd.read_csv(report / "failed_runs.csv").empty and pd.read_csv(report / "skipped.csv").empty
    assert "Main results" in out.stdout  # the report's console summary


def test_committed_smoke_results_are_complete():
    """The committed example (experiments/results/smoke/) holds the full smoke sweep and its whole report."""
    base = ROOT / "experiments" / "results" / "smoke"
    axes = EXPERIMENTS["smoke"][0]
    records = [json.loads(p.read_text()) for p in (base / "runs").glob("*/record.json")]
    n = 1
    for values in axes.values():
        n *= len(values)
    assert len(records) == n and all(r["status"] == "complete" for r in records)
    leftovers = {p.name for p in (base / "runs").rglob("*") if p.is_file()} - {"record.json", "log.csv"}
    assert not leftovers
    missing = [f for f in report_files(axes["task"], axes["task"]) if not _nonempty(base / "report" / f)]
    assert not missing, f"missing or empty report files: {missing}"
    main = pd.read_csv(base / "report" / "main_table.csv")
    assert len(main) == len(axes["task"]) * len(axes["method"]) * len(axes["data.k"]) and (main["n"] == 2).all()
    assert (base / "README.md").is_file()
