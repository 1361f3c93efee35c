"""Tests of the report layer (unipelt.report) on synthetic run records with known statistics.

Expected numbers are computed here from the generated scores (statistics/numpy), never copied from the code.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from unipelt.report import aggregate as A
from unipelt.report import cli, plots, tables
from unipelt.report.records import load_records

TASKS = ["rte", "sst2", "cola"]
KS = [100, 1000, "full"]
DATA_SEEDS = [11, 22, 33, 44, 55]
# Mean score per (method, task); chosen so the best single method on average (bitfit) is not the best on
# every task (lora wins sst2), which makes the upper bound differ from the best single method.
BASE = {
    "finetune": {"rte": 0.60, "sst2": 0.85, "cola": 0.40},
    "bitfit": {"rte": 0.70, "sst2": 0.80, "cola": 0.45},
    "adapter": {"rte": 0.62, "sst2": 0.83, "cola": 0.42},
    "lora": {"rte": 0.58, "sst2": 0.88, "cola": 0.41},
    "unipelt_apl": {"rte": 0.68, "sst2": 0.87, "cola": 0.47},
    "unipelt_apl_nogate": {"rte": 0.64, "sst2": 0.86, "cola": 0.43},
}
SINGLES = ["bitfit", "adapter", "lora"]  # single PELT methods present in the synthetic data
LAYERS = 3
DUP_KEY = ("sst2", "bitfit", 100, 11)


def _record(task: str, method: str, k, data_seed: int, score: float | None, **extra) -> dict:
    rec = {
        "schema_version": 1, "status": "complete", "run_id": f"{task}-{method}-k{k}-d{data_seed}-s42",
        "task": task, "method": method, "model": "minilm", "k": k, "data_seed": data_seed, "seed": 42,
        "main_metric": "accuracy", "dev_score": 0.5, "test_score": score, "unknown_extra_key": {"x": [1, 2]},
        "params": {"trainable": 1000 * (1 + len(method)), "percent": 0.1 * len(method)},
        "time": {"train_epoch_s": 2.0 + len(method), "train_step_s": 0.1 * len(method),
                 "inference_per_example_s": 0.001 * len(task)},
        "memory": {"peak_bytes": (100 + len(method)) * 2**20, "device": "cpu"},
        "gates": {},
    }
    rec.update(extra)
    return rec


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A runs folder plus what the report should find in it: scores per group, gates, skipped and failed files."""
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(0)
    scores: dict[tuple, list[float]] = {}
    seeds: dict[tuple, list[tuple]] = {}
    gates: dict[str, list[dict]] = {}
    for ki, k in enumerate(KS):
        for method, per_task in BASE.items():
            for task, base in per_task.items():
                if method == "adapter" and task == "cola" and k == 100:
                    continue  # adapter lacks a task at K=100 -> its avg gets a dagger
                for d in DATA_SEEDS:
                    if (task, method, k) == ("rte", "lora", 100) and d == 55:
                        continue  # missing seed -> flagged group
                    score = float(base + 0.02 * ki + rng.normal(0, 0.03))
                    extra = {}
                    if method == "unipelt_apl":
                        extra["gates"] = {"adapter_ffn": rng.uniform(0, 1, LAYERS).tolist(),
                                          "lora_query": rng.uniform(0, 1, LAYERS).tolist()}
                        gates.setdefault(task, []).append(extra["gates"])
                    rec = _record(task, method, k, d, score, **extra)
                    # one record under another file name: discovered because it carries schema_version
                    name = "run.json" if (task, method, k, d) == ("cola", "finetune", 1000, 33) else "record.json"
                    _write(root / rec["run_id"] / name, rec)
                    scores.setdefault((task, method, k), []).append(score)
                    seeds.setdefault((task, method, k), []).append((d, 42))
    # single-run group: std must be 0
    _write(root / "sst2-headonly-k100-d11-s42" / "record.json", _record("sst2", "headonly", 100, 11, 0.5))
    scores[("sst2", "headonly", 100)] = [0.5]
    seeds[("sst2", "headonly", 100)] = [(11, 42)]
    # duplicate of an existing run, later in path order, with a score that would move the mean a lot
    _write(root / "zz_dup" / "record.json", _record(*DUP_KEY, 0.0))
    _write(root / "broken" / "record.json", '{"status": "complete", "task": "rte", "met')
    noscore = _record("rte", "bitfit", 100, 99, None)
    del noscore["test_score"]
    _write(root / "noscore" / "record.json", noscore)
    _write(root / "some-run" / "config.json", {"lr": 1e-3})  # not a record: silently ignored
    failed = _record("rte", "prefix", 100, 11, None, status="failed", run_id="rte-prefix-k100-d11-s42",
                     failure={"error": "CUDA out of memory", "step": 42, "epoch": 3})
    del failed["test_score"]
    _write(root / failed["run_id"] / "record.json", failed)
    return {"root": root, "scores": scores, "seeds": seeds, "gates": gates, "failed": failed,
            "skipped": {"zz_dup/record.json": "duplicate", "broken/record.json": "JSON",
                        "noscore/record.json": "test_score"}}


@pytest.fixture(scope="module")
def agg(synthetic):
    return A.aggregate(A.runs_frame(load_records(synthetic["root"]).records), expected_seeds=5)


@pytest.fixture(scope="module")
def report(synthetic, tmp_path_factory):
    """The CLI run once (with figures) on the synthetic folder: exit code, console output, output folder."""
    out = tmp_path_factory.mktemp("report")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main([str(synthetic["root"]), "--out", str(out)])
    return {"rc": rc, "stdout": buf.getvalue(), "out": out}


def _mean(xs):
    return statistics.mean(xs)


def _std(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _task_means(synthetic, k, methods=None) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for (task, method, kk), xs in synthetic["scores"].items():
        if kk == k and (methods is None or method in methods):
            out.setdefault(method, {})[task] = _mean(xs)
    return out


# ---------------------------------------------------------------- reading + aggregation
def test_load_records_skips_bad_files_with_reasons(synthetic):
    rs = load_records(synthetic["root"])
    reasons = {p.relative_to(synthetic["root"]).as_posix(): r for p, r in rs.skipped}
    assert set(reasons) == set(synthetic["skipped"])
    for path, word in synthetic["skipped"].items():
        assert word in reasons[path]
    assert len(rs.records) == sum(len(v) for v in synthetic["scores"].values())
    assert [r["run_id"] for r in rs.failed] == [synthetic["failed"]["run_id"]]


def test_aggregate_means_stds_counts_and_flags(synthetic, agg):
    assert len(agg) == len(synthetic["scores"])
    for (task, method, k), xs in synthetic["scores"].items():
        row = agg[(agg.task == task) & (agg.method == method) & (agg.k.map(lambda v: v == k))]
        assert len(row) == 1
        r = row.iloc[0]
        assert r["mean"] == pytest.approx(_mean(xs), abs=1e-12)
        assert r["std"] == pytest.approx(_std(xs), abs=1e-12)
        assert r["n"] == len(xs)
        assert bool(r["flagged"]) == (len(xs) < 5)
    assert agg["flagged"].sum() == 2  # the missing-seed group and the single-run group


def test_expected_seeds_is_configurable(synthetic):
    agg4 = A.aggregate(A.runs_frame(load_records(synthetic["root"]).records), expected_seeds=4)
    flagged = agg4[agg4.flagged]
    assert list(zip(flagged.task, flagged.method)) == [("sst2", "headonly")]


def test_duplicate_keeps_first_by_path_order(synthetic, agg):
    task, method, k, _ = DUP_KEY
    r = agg[(agg.task == task) & (agg.method == method) & (agg.k.map(lambda v: v == k))].iloc[0]
    assert r["n"] == 5
    assert r["mean"] == pytest.approx(_mean(synthetic["scores"][(task, method, k)]))


def test_failed_runs_listed_apart_not_aggregated(synthetic, agg):
    assert "prefix" not in set(agg.method)
    t = tables.failed_table(load_records(synthetic["root"]).failed)
    row = t.frame.iloc[0]
    assert (row.run_id, row.task, row.method, row.k, row.seed, row.error, row.step) == (
        "rte-prefix-k100-d11-s42", "rte", "prefix", 100, 42, "CUDA out of memory", 42)
    assert "CUDA out of memory" in t.to_markdown()


# ---------------------------------------------------------------- main table
def _md_blocks(md: str) -> dict[str, list[dict[str, str]]]:
    """Parse the Markdown of a table into {block title: [ {column: cell} per row ]}."""
    blocks, title, header = {}, None, None
    for line in md.splitlines():
        if line.startswith("**") and line.endswith("**"):
            title, header = line.strip("*"), None
            blocks[title] = []
        elif line.startswith("|") and title is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-: "):
                blocks[title].append(dict(zip(header, cells)))
    return blocks


def test_main_table_bold_marks_column_best(synthetic, agg):
    md = tables.main_table(agg).to_markdown()
    blocks = _md_blocks(md)
    assert list(blocks) == [tables.k_label(k) for k in KS]  # K order: 100, 1000, full
    for k in KS:
        rows = {r["Method"]: r for r in blocks[tables.k_label(k)]}
        means = _task_means(synthetic, k)
        assert list(rows) == A.sort_methods(means)
        for task in TASKS:
            best = max((m for m in means if task in means[m]), key=lambda m: means[m][task])
            bold = [m for m, r in rows.items() if "**" in r[tables.task_label(task)]]
            assert bold == [best]
            assert rows[best][tables.task_label(task)].startswith(f"**{100 * means[best][task]:.1f}**")
        # avg: over the method's tasks; dagger when it lacks one; best among complete methods is bold
        avgs = {m: _mean(list(t.values())) for m, t in means.items()}
        complete = [m for m in means if len(means[m]) == len(TASKS)]
        for m, r in rows.items():
            assert r["Avg"].strip("*†") == f"{100 * avgs[m]:.1f}"
            assert r["Avg"].endswith("†") == (m not in complete)
        assert [m for m, r in rows.items() if "**" in r["Avg"]] == [max(complete, key=avgs.get)]


def test_main_table_flags_groups_with_missing_seeds(agg):
    md = tables.main_table(agg).to_markdown()
    rows = {r["Method"]: r for r in _md_blocks(md)[tables.k_label(100)]}
    assert rows["lora"]["RTE"].endswith("*") and not rows["lora"]["SST-2"].endswith("*")
    assert rows["headonly"]["SST-2"] == "50.0*"  # one seed: no std shown
    assert "fewer than 5 seeds" in md


def _latex_cells(row: str) -> int:
    """Number of columns a tabular row spans (\\multicolumn{n} counts n)."""
    cells = re.split(r"(?<!\\)&", row.rstrip().removesuffix("\\\\"))
    return sum(int(m.group(1)) if (m := re.match(r"\s*\\multicolumn\{(\d+)\}", c)) else 1 for c in cells)


def test_main_table_latex_is_balanced_and_marks_best(synthetic, agg):
    tex = tables.main_table(agg).to_latex()
    for env in set(re.findall(r"\\begin\{(\w+)\}", tex)):
        assert tex.count(f"\\begin{{{env}}}") == tex.count(f"\\end{{{env}}}")
    spec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", tex).group(1)
    body = tex[tex.index("\\toprule"): tex.index("\\end{tabular}")]
    rows = [line for line in body.splitlines() if line.rstrip().endswith("\\\\")]
    assert len(rows) > 20
    assert all(_latex_cells(r) == len(spec) for r in rows)
    assert tex.index("\\toprule") < tex.index("\\midrule") < tex.index("\\bottomrule")
    assert "unipelt\\_apl\\_nogate &" in tex and not re.search(r"[^\\]_", tex.replace("\\_", ""))
    # best of each column is the \textbf cell (K=100 block)
    block = [r.split(" & ") for r in body[body.index("K = 100"): body.index("K = 1000")].splitlines() if " & " in r]
    means = _task_means(synthetic, 100)
    for j, task in enumerate([t for t in A.TASK_ORDER if t in TASKS]):
        best = max((m for m in means if task in means[m]), key=lambda m: means[m][task])
        bold_rows = [cells[0] for cells in block if "\\textbf" in cells[j + 1]]
        assert bold_rows == [tables.tex_escape(best)]


def test_main_table_csv_round_trips(synthetic, agg, tmp_path):
    written = tables.main_table(agg).write(tmp_path, "main_table", ["csv"])
    back = pd.read_csv(written["main_table.csv"])
    back["k"] = A.normalize_k_column(back["k"])
    assert list(back.columns) == ["task", "method", "model", "k", "mean", "std", "n", "flagged"]
    assert len(back) == len(synthetic["scores"])
    for r in back.itertuples():
        xs = synthetic["scores"][(r.task, r.method, r.k)]
        assert r.mean == pytest.approx(_mean(xs), rel=1e-12)
        assert r.std == pytest.approx(_std(xs), rel=1e-12, abs=1e-15)
        assert (r.n, r.flagged) == (len(xs), len(xs) < 5)


# ---------------------------------------------------------------- headline, ablation, efficiency
def test_headline_differences_match_independent_computation(synthetic, agg):
    head = A.headline(agg, "unipelt_apl", A.SINGLE_METHODS)
    for k in KS:
        means = _task_means(synthetic, k)
        gated = means["unipelt_apl"]
        tasks = list(gated)
        singles = {m: means[m] for m in SINGLES if all(t in means[m] for t in tasks)}
        best = max(singles, key=lambda m: _mean([singles[m][t] for t in tasks]))
        upper = {t: max(means[m][t] for m in SINGLES if t in means[m]) for t in tasks}
        blk = head[head.k.map(lambda v: v == k)]

        def val(row, task):
            sel = blk[(blk.row == row) & (blk.task == task)]
            assert len(sel) == 1, (row, task)
            return sel.value.iloc[0]

        assert blk[blk.row == "best_single"].method.iloc[0] == best
        for t in tasks:
            assert val("diff_best_single", t) == pytest.approx(gated[t] - means[best][t])
            assert val("diff_upper_bound", t) == pytest.approx(gated[t] - upper[t])
        g_avg = _mean(list(gated.values()))
        assert val("diff_best_single", "avg") == pytest.approx(g_avg - _mean([means[best][t] for t in tasks]))
        assert val("diff_upper_bound", "avg") == pytest.approx(g_avg - _mean(list(upper.values())))
    # the K=100 upper bound really mixes methods, so the two baselines differ
    assert set(head[(head.row == "upper_bound") & (head.task != "avg")].method) >= {"bitfit", "lora"}
    md = tables.headline_table(head).to_markdown()
    assert "Δ vs best single" in md and "Δ vs upper bound" in md


def test_ablation_pairs_gated_and_fixed(synthetic, agg):
    abl = A.ablation(agg)
    assert set(abl.method) == {"unipelt_apl", "unipelt_apl_nogate"}
    for k in KS:
        means = _task_means(synthetic, k)
        d = abl[(abl.row == "delta_gate") & abl.k.map(lambda v: v == k)].set_index("task").value
        for t in TASKS:
            assert d[t] == pytest.approx(means["unipelt_apl"][t] - means["unipelt_apl_nogate"][t])
    md = tables.ablation_table(abl).to_markdown()
    rows = [r["Method"] for r in _md_blocks(md)[tables.k_label(100)]]
    assert rows == ["unipelt_apl", "unipelt_apl_nogate", "Δ gate (unipelt_apl)"]


def test_efficiency_means_and_ratio_to_finetune(synthetic):
    runs = A.runs_frame(load_records(synthetic["root"]).records)
    eff = A.efficiency(runs).set_index("method")
    # every run of a method shares the same synthetic efficiency numbers (functions of the name length)
    for m in ["bitfit", "unipelt_apl"]:
        assert eff.loc[m, "trainable"] == 1000 * (1 + len(m))
        assert eff.loc[m, "train_step_ms"] == pytest.approx(100 * len(m))
        assert eff.loc[m, "peak_mem_mib"] == pytest.approx(100 + len(m))
        assert eff.loc[m, "train_step_ms_ratio"] == pytest.approx(len(m) / len("finetune"))
        assert eff.loc[m, "trainable_ratio"] == pytest.approx((1 + len(m)) / (1 + len("finetune")))
    md = tables.efficiency_table(A.efficiency(runs)).to_markdown()
    assert "(1.00×)" in md and "Peak mem (MiB)" in md


def test_efficiency_table_from_bench():
    rows = [
        {"method": "finetune", "model": "minilm", "dtype": "fp32", "batch": 32, "trainable": 22_000_000,
         "percent": 100.0, "train_step_ms": 200.0, "infer_ms": 10.0, "peak_mem_mb": 2000.0},
        {"method": "lora", "model": "minilm", "dtype": "fp32", "batch": 32, "trainable": 100_000,
         "percent": 0.45, "train_step_ms": 120.0, "infer_ms": 11.0, "peak_mem_mb": 900.0},
        {"method": "lora", "model": "minilm", "dtype": "fp32", "batch": 32, "trainable": 100_000,
         "percent": 0.45, "train_step_ms": 140.0, "infer_ms": 11.0, "peak_mem_mb": 900.0},
        {"method": "lora", "model": "minilm", "dtype": "bf16", "batch": 32, "trainable": 100_000,
         "percent": 0.45, "train_step_ms": 60.0, "infer_ms": 5.0, "peak_mem_mb": 500.0},
    ]
    t = tables.efficiency_table_from_bench(rows, reference="finetune")
    f = t.frame.set_index(["method", "dtype"])
    assert f.loc[("lora", "fp32"), "train_step_ms"] == pytest.approx(130.0)
    assert f.loc[("lora", "fp32"), "train_step_ms_ratio"] == pytest.approx(130.0 / 200.0)
    assert f.loc[("lora", "fp32"), "peak_mem_mb_ratio"] == pytest.approx(0.45)
    assert np.isnan(f.loc[("lora", "bf16"), "train_step_ms_ratio"])  # no finetune row at bf16
    md = t.to_markdown()
    assert "(0.65×)" in md and "22.0M" in md


# ---------------------------------------------------------------- plots
def test_score_vs_k_data_matches_aggregate(synthetic, agg, tmp_path):
    runs = A.runs_frame(load_records(synthetic["root"]).records)
    series = plots.plot_score_vs_k(runs, tmp_path / "score_vs_k")
    assert set(series) == set(BASE) | {"headonly"}
    for method, (xs, ys, ss) in series.items():
        expected_ks = [k for k in KS if isinstance(k, int) and _task_means(synthetic, k).get(method)]
        assert xs == expected_ks  # "full" is not on the log-K axis
        for k, y, s in zip(xs, ys, ss):
            a = agg[(agg.method == method) & agg.k.map(lambda v: v == k)]
            assert y == pytest.approx(100 * a["mean"].mean())
            # std over seeds of the per-seed task average (seeds present for every task)
            per_task = {t: dict(zip(synthetic["seeds"][(t, method, k)], synthetic["scores"][(t, method, k)]))
                        for t in a.task}
            common = set.intersection(*(set(v) for v in per_task.values()))
            seed_avgs = [_mean([per_task[t][sd] for t in per_task]) for sd in common]
            assert s == pytest.approx(100 * _std(seed_avgs))
    for ext, magic in (("png", b"\x89PNG"), ("pdf", b"%PDF")):
        data = (tmp_path / f"score_vs_k.{ext}").read_bytes()
        assert data.startswith(magic) and len(data) > 1000


def test_gate_heatmap_data_is_mean_over_runs(synthetic):
    runs = A.runs_frame(load_records(synthetic["root"]).records)
    data = plots.gate_data(runs, preferred="unipelt_apl")
    assert set(data) == set(TASKS)
    for task, d in data.items():
        assert d["method"] == "unipelt_apl" and d["submodules"] == ["adapter_ffn", "lora_query"]
        expected = np.array([[np.mean([g[s][i] for g in synthetic["gates"][task]]) for i in range(LAYERS)]
                             for s in d["submodules"]])
        np.testing.assert_allclose(d["matrix"], expected)
        assert d["n_runs"] == len(synthetic["gates"][task])


# ---------------------------------------------------------------- CLI
def test_cli_writes_everything_and_exits_0(report, synthetic):
    assert report["rc"] == 0
    out = report["out"]
    expected = [f"{stem}.{ext}" for stem in ("main_table", "headline", "ablation") for ext in ("md", "tex", "csv")]
    expected += ["efficiency.md", "efficiency.csv", "failed_runs.md", "failed_runs.csv", "skipped.csv",
                 "aggregate.json", "aggregate.parquet"]
    expected += [f"{stem}.{ext}" for stem in ["score_vs_k"] + [f"score_vs_k_{t}" for t in TASKS]
                 + [f"gates_{t}" for t in TASKS] for ext in ("png", "pdf")]
    for name in expected:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    stdout = report["stdout"]
    assert "### Main results" in stdout
    for path, word in synthetic["skipped"].items():
        assert re.search(rf"{re.escape(path)}.*{word}", stdout.replace("\\", "/"))
    assert "CUDA out of memory" in stdout and "1 failed run" in stdout
    # aggregate data files read back to the same statistics
    for frame in (pd.read_json(out / "aggregate.json"), pd.read_parquet(out / "aggregate.parquet")):
        frame["k"] = A.normalize_k_column(frame["k"])
        assert len(frame) == len(synthetic["scores"])
        for r in frame.itertuples():
            assert r.mean == pytest.approx(_mean(synthetic["scores"][(r.task, r.method, r.k)]), rel=1e-12)


def test_build_report_returns_written_files(synthetic, tmp_path):
    written = cli.build_report(synthetic["root"], tmp_path / "r", plots=False, formats=["md"])
    assert {"main_table.md", "headline.md", "ablation.md", "aggregate.json"} <= set(written)
    assert not any(name.endswith((".png", ".tex")) for name in written)
    assert all(p.is_file() for p in written.values())


def test_cli_missing_or_empty_folder_exits_2(tmp_path, capsys):
    assert cli.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    _write(empty / "a" / "record.json", "{not json")
    assert cli.main([str(empty), "--out", str(tmp_path / "o"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "no valid run records" in err and "not valid JSON" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(cli.ReportError):
        cli.build_report(tmp_path / "nope", tmp_path / "o")


# ---------------------------------------------------------------- two sweeps compared
def _other_sweep(root: Path) -> dict[tuple, list[float]]:
    """A second sweep of part of the grid (K=100 and K=1000, no unipelt_apl_nogate, no cola for lora) with its own
    scores; returns them per (task, method, k)."""
    rng = np.random.default_rng(1)
    scores: dict[tuple, list[float]] = {}
    for k in (100, 1000):
        for method, per_task in BASE.items():
            if method == "unipelt_apl_nogate":
                continue
            for task, base in per_task.items():
                if (method, task) == ("lora", "cola"):
                    continue
                for d in DATA_SEEDS:
                    score = float(base - 0.05 + rng.normal(0, 0.03))
                    rec = _record(task, method, k, d, score)
                    _write(root / "runs" / rec["run_id"] / "record.json", rec)
                    scores.setdefault((task, method, k), []).append(score)
    return scores


def test_paired_runs_counts_the_same_runs_and_equal_scores(synthetic, tmp_path):
    """Runs match by task, method, model, K, data seed and seed; the count of equal test scores is exact."""
    this = load_records(synthetic["root"]).records
    copy = [dict(r) for r in this if r["method"] == "bitfit"]
    for r in copy[:3]:
        r["test_score"] = r["test_score"] + 0.01
    copy.append(_record("rte", "bitfit", 100, 999, 0.5))  # a run the first sweep does not have
    bitfit = sum(1 for r in this if r["method"] == "bitfit")
    assert A.paired_runs(this, copy) == (bitfit, bitfit - 3)
    assert A.paired_runs(this, []) == (0, 0)


def test_sweep_comparison_is_the_difference_of_cell_means(synthetic, agg, tmp_path):
    other_scores = _other_sweep(tmp_path / "other")
    other = A.aggregate(A.runs_frame(load_records(tmp_path / "other").records), expected_seeds=5)
    cmp = A.sweep_comparison(agg, other)
    assert set(cmp["k"]) == {100, 1000}  # "full" is in one sweep only
    assert "unipelt_apl_nogate" not in set(cmp["method"]) and "headonly" not in set(cmp["method"])
    for k in (100, 1000):
        for method in ("bitfit", "lora", "adapter"):
            rows = cmp[(cmp["k"] == k) & (cmp["method"] == method)]
            tasks = {t for (t, m, kk) in other_scores if m == method and kk == k} & \
                {t for (t, m, kk) in synthetic["scores"] if m == method and kk == k}
            this = {t: _mean(synthetic["scores"][(t, method, k)]) for t in tasks}
            that = {t: _mean(other_scores[(t, method, k)]) for t in tasks}
            got = {(r.row, r.task): r.value for r in rows.itertuples()}
            for t in tasks:
                assert got[("this", t)] == pytest.approx(this[t], abs=1e-12)
                assert got[("other", t)] == pytest.approx(that[t], abs=1e-12)
                assert got[("diff", t)] == pytest.approx(this[t] - that[t], abs=1e-12)
            # the average is over the tasks both sweeps have (lora: no cola; adapter at K=100: no cola)
            assert {t for (row, t) in got if row == "diff"} == tasks | {"avg"}
            expected_avg = statistics.mean(this.values()) - statistics.mean(that.values())
            assert got[("diff", "avg")] == pytest.approx(expected_avg, abs=1e-12)


def test_cli_compare_with_writes_the_table_and_checks_the_folder_first(synthetic, tmp_path, capsys):
    _other_sweep(tmp_path / "second")
    out = tmp_path / "r"
    assert cli.main([str(synthetic["root"]), "--out", str(out), "--no-plots", "--formats", "md,csv",
                     "--compare-with", str(tmp_path / "second" / "runs")]) == 0
    md = (out / "compare.md").read_text()
    # default labels: the folder's name, or its parent's for a folder called runs
    assert f"{synthetic['root'].name} vs second" in md and "Δ bitfit" in md
    keys = [{(r["task"], r["method"], r["k"], r["data_seed"]) for r in load_records(root).records}
            for root in (synthetic["root"], tmp_path / "second")]
    assert f"{len(keys[0] & keys[1])} runs are in both sweeps" in md and "0 of them have the same test score" in md
    frame = pd.read_csv(out / "compare.csv")
    assert set(frame["row"]) == {"this", "other", "diff"}
    # a bad --compare-with stops before anything is written
    bad_out = tmp_path / "bad"
    assert cli.main([str(synthetic["root"]), "--out", str(bad_out), "--compare-with", str(tmp_path / "nope")]) == 2
    assert "--compare-with" in capsys.readouterr().err and not bad_out.exists()
    for labels in ("only-one", "a,b,c", "a,"):
        with pytest.raises(SystemExit):
            cli.parser().parse_args([str(synthetic["root"]), "--labels", labels])
        assert "two names" in capsys.readouterr().err
