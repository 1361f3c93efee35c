"""Turn run records into tidy frames: per-run rows, per-group seed statistics, and the derived comparisons
(method averages, headline, ablation, efficiency) that the tables render.

Scores stay on the records' own scale ([0, 1], or [-1, 1] for spearman) here; only the renderers multiply by 100,
so every CSV/JSON/parquet output can be compared with the records directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .records import DEFAULT_MODEL, PATH_KEY, record_key

GROUP_KEYS = ["task", "method", "model", "k"]
AGG_COLUMNS = GROUP_KEYS + ["mean", "std", "n", "flagged"]
DEFAULT_EXPECTED_SEEDS = 5
DEFAULT_GATED = "unipelt_apl"
SINGLE_METHODS = ("bitfit", "adapter", "houlsby", "prefix", "lora")
REFERENCE_METHOD = "finetune"

TASK_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
BASE_METHOD_ORDER = ("finetune", "headonly", "bitfit", "adapter", "houlsby", "prefix", "lora")
UNIPELT_SUBSET_ORDER = ("ap", "apl", "aplb")
K_ORDER = (100, 500, 1000)
NOGATE_SUFFIX = "_nogate"
UNIPELT_PREFIX = "unipelt_"


# ---------------------------------------------------------------- ordering
def method_sort_key(method: str) -> tuple:
    """Paper order: baselines, single PELT methods, unipelt_{ap,apl,aplb}, their _nogate twins, then the rest."""
    if method in BASE_METHOD_ORDER:
        return (0, BASE_METHOD_ORDER.index(method), 0, "")
    if method.startswith(UNIPELT_PREFIX):
        subset = method[len(UNIPELT_PREFIX):]
        nogate = subset.endswith(NOGATE_SUFFIX)
        if nogate:
            subset = subset[: -len(NOGATE_SUFFIX)]
        rank = UNIPELT_SUBSET_ORDER.index(subset) if subset in UNIPELT_SUBSET_ORDER else len(UNIPELT_SUBSET_ORDER)
        return (1, int(nogate), rank, subset)
    return (2, 0, 0, method)


def k_sort_key(k: Any) -> tuple:
    """100, 500, 1000, then other integer K ascending, then anything else, "full" last."""
    if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
        return (0, K_ORDER.index(k), 0) if k in K_ORDER else (1, int(k), "")
    if k == "full":
        return (3, 0, "")
    return (2, 0, str(k))


def task_sort_key(task: str) -> tuple:
    """GLUE order of docs/run_record.md, unknown tasks alphabetically after."""
    return (0, TASK_ORDER.index(task), "") if task in TASK_ORDER else (1, 0, task)


def sort_methods(methods: Iterable[str]) -> list[str]:
    return sorted(set(methods), key=method_sort_key)


def sort_tasks(tasks: Iterable[str]) -> list[str]:
    return sorted(set(tasks), key=task_sort_key)


def _rank(values: pd.Series, key) -> pd.Series:
    order = {v: i for i, v in enumerate(sorted(set(values), key=key))}
    return values.map(order)


def sort_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Sort a frame with any of k/model/task/method columns in display order."""
    keys = [("k", k_sort_key), ("model", str), ("method", method_sort_key), ("task", task_sort_key)]
    ranks = {f"_r_{col}": _rank(df[col], key) for col, key in keys if col in df.columns}
    if not ranks or df.empty:
        return df.reset_index(drop=True)
    return df.assign(**ranks).sort_values(list(ranks), kind="stable").drop(columns=list(ranks)).reset_index(drop=True)


def normalize_k_column(k: pd.Series) -> pd.Series:
    """Undo serialization of K (CSV/parquet store it as text): digit strings back to int, "full" stays."""
    return k.map(lambda v: int(v) if isinstance(v, (str, int, np.integer)) and str(v).isdigit() else v).astype(object)


# ---------------------------------------------------------------- per run
def _dig(rec: dict[str, Any], *keys: str) -> Any:
    cur: Any = rec
    for key in keys:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(key)
    return cur


_RUN_FIELDS = {
    "trainable": ("params", "trainable"),
    "percent": ("params", "percent"),
    "train_epoch_s": ("time", "train_epoch_s"),
    "train_step_s": ("time", "train_step_s"),
    "inference_per_example_s": ("time", "inference_per_example_s"),
    "peak_bytes": ("memory", "peak_bytes"),
}


def runs_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per run with the fields the report needs (missing nested values become NaN)."""
    rows = []
    for rec in records:
        row = {
            "path": rec.get(PATH_KEY),
            "run_id": rec.get("run_id"),
            "task": rec["task"],
            "method": rec["method"],
            "model": rec.get("model") or DEFAULT_MODEL,
            "k": rec["k"],
            "data_seed": rec["data_seed"],
            "seed": rec.get("seed"),
            "test_score": rec.get("test_score"),
            "dev_score": rec.get("dev_score"),
        }
        row.update({name: _dig(rec, *path) for name, path in _RUN_FIELDS.items()})
        row["gates"] = rec.get("gates") if isinstance(rec.get("gates"), dict) else {}
        rows.append(row)
    columns = ["path", "run_id", "task", "method", "model", "k", "data_seed", "seed", "test_score", "dev_score",
               *_RUN_FIELDS, "gates"]
    df = pd.DataFrame(rows, columns=columns)
    for col in ["test_score", "dev_score", *_RUN_FIELDS]:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["k"] = df["k"].astype(object)
    return df


# ---------------------------------------------------------------- per group
def aggregate(runs: pd.DataFrame, expected_seeds: int = DEFAULT_EXPECTED_SEEDS) -> pd.DataFrame:
    """Mean, sample std (ddof=1; 0 for a single run) and count of test_score per (task, method, model, k).

    `flagged` marks groups with fewer runs than `expected_seeds`, whose mean is less trustworthy.
    """
    if runs.empty:
        return pd.DataFrame(columns=AGG_COLUMNS)
    grouped = runs.groupby(GROUP_KEYS, sort=False, dropna=False)["test_score"]
    agg = grouped.agg(mean="mean", std="std", n="count").reset_index()
    agg["std"] = agg["std"].where(agg["n"] > 1, 0.0).astype(float)
    agg["n"] = agg["n"].astype(int)
    agg["flagged"] = agg["n"] < expected_seeds
    agg["k"] = agg["k"].astype(object)
    return sort_frame(agg[AGG_COLUMNS])


def blocks(agg: pd.DataFrame) -> list[tuple[Any, str]]:
    """The (k, model) blocks of a table, in display order."""
    pairs = set(zip(agg["k"], agg["model"]))
    return sorted(pairs, key=lambda p: (k_sort_key(p[0]), str(p[1])))


def block_frame(agg: pd.DataFrame, k: Any, model: str) -> pd.DataFrame:
    mask = (agg["k"].map(lambda v: v == k)) & (agg["model"] == model)
    return agg[mask]


def method_averages(agg: pd.DataFrame) -> pd.DataFrame:
    """Average over tasks of the per-task means, per (k, model, method).

    Only tasks present in that (k, model) block count; `partial` is True when the method lacks a task that other
    methods of the block have (its average is then over fewer tasks and is marked with a dagger).
    """
    rows = []
    for k, model in blocks(agg):
        blk = block_frame(agg, k, model)
        block_tasks = set(blk["task"])
        for method, m in blk.groupby("method", sort=False):
            rows.append({"k": k, "model": model, "method": method, "avg": float(m["mean"].mean()),
                         "n_tasks": len(m), "partial": set(m["task"]) != block_tasks,
                         "flagged": bool(m["flagged"].any())})
    df = pd.DataFrame(rows, columns=["k", "model", "method", "avg", "n_tasks", "partial", "flagged"])
    df["k"] = df["k"].astype(object)
    return sort_frame(df)


# ---------------------------------------------------------------- comparisons
COMPARISON_COLUMNS = ["k", "model", "row", "method", "task", "value", "std", "n", "flagged", "partial"]


def _method_rows(blk: pd.DataFrame, method: str, row: str, tasks: Sequence[str]) -> list[dict[str, Any]]:
    """Per-task rows for one method (restricted to `tasks`) plus its avg row."""
    m = blk[(blk["method"] == method) & blk["task"].isin(tasks)]
    out = [{"row": row, "method": method, "task": r.task, "value": r.mean, "std": r.std, "n": r.n,
            "flagged": bool(r.flagged), "partial": False} for r in m.itertuples()]
    if not m.empty:
        out.append({"row": row, "method": method, "task": "avg", "value": float(m["mean"].mean()),
                    "std": np.nan, "n": np.nan, "flagged": bool(m["flagged"].any()),
                    "partial": set(m["task"]) != set(tasks)})
    return out


def _diff_rows(a: list[dict[str, Any]], b: list[dict[str, Any]], row: str, method: str) -> list[dict[str, Any]]:
    """a − b per task present in both (avg: difference of the two averages)."""
    bv = {r["task"]: r for r in b}
    return [{"row": row, "method": method, "task": r["task"], "value": r["value"] - bv[r["task"]]["value"],
             "std": np.nan, "n": np.nan, "flagged": r["flagged"] or bv[r["task"]]["flagged"],
             "partial": r["partial"] or bv[r["task"]]["partial"]}
            for r in a if r["task"] in bv]


def _finish(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    df["k"] = df["k"].astype(object)
    df["n"] = df["n"].astype("Int64")  # empty on avg/difference rows
    return df


def headline(agg: pd.DataFrame, gated: str = DEFAULT_GATED,
             singles: Sequence[str] = SINGLE_METHODS) -> pd.DataFrame:
    """Gated combination vs (a) the best single method on average and (b) the per-task upper bound, per block.

    Tasks are those the gated method has in the block. The best single method is the one with the highest
    average over those tasks among single methods that cover all of them (any single method if none does).
    The upper bound takes, per task, the best single method's mean. Rows (column `row`): gated, best_single,
    diff_best_single (gated − best single), upper_bound (method = the per-task winner), diff_upper_bound.
    """
    rows: list[dict[str, Any]] = []
    for k, model in blocks(agg):
        blk = block_frame(agg, k, model)
        tasks = sort_tasks(blk.loc[blk["method"] == gated, "task"])
        single = blk[blk["method"].isin(list(singles)) & blk["task"].isin(tasks)]
        if not tasks or single.empty:
            continue
        means = single.pivot(index="method", columns="task", values="mean")
        means = means.reindex(columns=tasks)
        best = min(means.index, key=lambda m: (not means.loc[m].notna().all(), -means.loc[m].mean(),
                                               method_sort_key(m)))
        g_rows = _method_rows(blk, gated, "gated", tasks)
        b_rows = _method_rows(blk, best, "best_single", tasks)
        u_rows = []
        for task in tasks:
            col = means[task].dropna()
            if col.empty:
                continue
            winner = sorted(col.index[col == col.max()], key=method_sort_key)[0]
            r = blk[(blk["method"] == winner) & (blk["task"] == task)].iloc[0]
            u_rows.append({"row": "upper_bound", "method": winner, "task": task, "value": float(r["mean"]),
                           "std": float(r["std"]), "n": int(r["n"]), "flagged": bool(r["flagged"]),
                           "partial": False})
        u_rows.append({"row": "upper_bound", "method": "", "task": "avg",
                       "value": float(np.mean([r["value"] for r in u_rows])), "std": np.nan, "n": np.nan,
                       "flagged": any(r["flagged"] for r in u_rows), "partial": len(u_rows) < len(tasks)})
        block_rows = (g_rows + b_rows + _diff_rows(g_rows, b_rows, "diff_best_single", best) + u_rows
                      + _diff_rows(g_rows, u_rows, "diff_upper_bound", "upper_bound"))
        rows += [{"k": k, "model": model, **r} for r in block_rows]
    return _finish(rows)


def ablation(agg: pd.DataFrame) -> pd.DataFrame:
    """Each unipelt_X (gated) next to unipelt_X_nogate (fixed gates), plus their difference when both exist.

    Rows: gated, fixed, delta_gate (gated − fixed); the `method` column names the actual method (delta rows:
    the gated one). Only methods present in the data appear.
    """
    combos = agg[agg["method"].str.startswith(UNIPELT_PREFIX)]
    rows: list[dict[str, Any]] = []
    for k, model in blocks(combos):
        blk = block_frame(combos, k, model)
        tasks = sort_tasks(blk["task"])
        present = set(blk["method"])
        bases = sort_methods(m[: -len(NOGATE_SUFFIX)] if m.endswith(NOGATE_SUFFIX) else m for m in present)
        for base in bases:
            g_rows = _method_rows(blk, base, "gated", tasks) if base in present else []
            f_rows = _method_rows(blk, base + NOGATE_SUFFIX, "fixed", tasks)
            d_rows = _diff_rows(g_rows, f_rows, "delta_gate", base) if g_rows and f_rows else []
            rows += [{"k": k, "model": model, **r} for r in g_rows + f_rows + d_rows]
    return _finish(rows)


def sweep_comparison(agg: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """This sweep's means next to another sweep's, cell by cell, and their difference: the same grid run two ways
    (another precision, trainer or dropout scheme) is judged by its means, since its runs are not the same runs.

    Per (k, model, method) present in both: rows `this`, `other` (per task, and avg over the tasks both have) and
    `diff` (this − other). Blocks, methods and tasks that only one sweep has are left out.
    """
    rows: list[dict[str, Any]] = []
    for k, model in blocks(agg):
        blk, oblk = block_frame(agg, k, model), block_frame(other, k, model)
        for method in sort_methods(set(blk["method"]) & set(oblk["method"])):
            tasks = sort_tasks(set(blk.loc[blk["method"] == method, "task"])
                               & set(oblk.loc[oblk["method"] == method, "task"]))
            if not tasks:
                continue
            a, b = _method_rows(blk, method, "this", tasks), _method_rows(oblk, method, "other", tasks)
            rows += [{"k": k, "model": model, **r} for r in a + b + _diff_rows(a, b, "diff", method)]
    return _finish(rows)


def paired_runs(records: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """(runs in both sweeps, of those the runs with the same test score): how far the two are the same runs, beside
    how far their means agree. A run is the same run by its record key (task, method, model, K, data seed, seed)."""
    theirs = {record_key(r): r.get("test_score") for r in other}
    both = [(r.get("test_score"), theirs[record_key(r)]) for r in records if record_key(r) in theirs]
    return len(both), sum(1 for a, b in both if a == b)


# ---------------------------------------------------------------- efficiency
RECORD_EFFICIENCY_METRICS = ("trainable", "percent", "train_epoch_s", "train_step_ms", "infer_ms", "peak_mem_mib")
BENCH_EFFICIENCY_METRICS = ("trainable", "percent", "train_step_ms", "infer_ms", "peak_mem_mb")
NO_RATIO = ("percent",)


def add_ratios(df: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str], reference: str) -> pd.DataFrame:
    """Add `<metric>_ratio` = value / value of `reference` in the same group (same keys except method)."""
    others = [k for k in keys if k != "method"]
    ratio_metrics = [m for m in metrics if m not in NO_RATIO]
    ref = df.loc[df["method"] == reference, others + ratio_metrics].drop_duplicates(others)
    ref = ref.rename(columns={m: f"_ref_{m}" for m in ratio_metrics})
    if others:
        merged = df.merge(ref, on=others, how="left")
    else:
        merged = df.assign(**{f"_ref_{m}": (ref[f"_ref_{m}"].iloc[0] if len(ref) else np.nan) for m in ratio_metrics})
    for m in ratio_metrics:
        ratio = merged[m].astype(float) / merged[f"_ref_{m}"].astype(float)
        merged[f"{m}_ratio"] = ratio.replace([np.inf, -np.inf], np.nan)
    return merged.drop(columns=[f"_ref_{m}" for m in ratio_metrics])


def efficiency(runs: pd.DataFrame, reference: str = REFERENCE_METHOD, k: Any = None) -> pd.DataFrame:
    """Per (method, model): mean trainable params, %, epoch/step time, inference time per example, peak memory.

    Units match the benchmark rows (ms, MiB). Epoch time depends on K (more examples per epoch), so pass `k`
    to compare methods at one K; with k=None all runs are pooled.
    """
    df = runs if k is None else runs[runs["k"].map(lambda v: v == k)]
    df = df.assign(train_step_ms=df["train_step_s"] * 1e3, infer_ms=df["inference_per_example_s"] * 1e3,
                   peak_mem_mib=df["peak_bytes"] / 2**20)
    out = (df.groupby(["method", "model"], sort=False)
           .agg(n_runs=("test_score", "size"), **{m: (m, "mean") for m in RECORD_EFFICIENCY_METRICS})
           .reset_index())
    return sort_frame(add_ratios(out, ["method", "model"], RECORD_EFFICIENCY_METRICS, reference))


def efficiency_from_bench(rows: Sequence[dict[str, Any]], reference: str = REFERENCE_METHOD) -> pd.DataFrame:
    """Benchmark rows {method, model, dtype, batch, trainable, percent, train_step_ms, infer_ms, peak_mem_mb}
    averaged per (method, model, dtype, batch) (repeats allowed), with ratios to `reference` at equal
    model/dtype/batch."""
    keys = ["method", "model", "dtype", "batch"]
    df = pd.DataFrame(list(rows))
    for col in keys + list(BENCH_EFFICIENCY_METRICS):
        if col not in df.columns:
            df[col] = np.nan if col in BENCH_EFFICIENCY_METRICS else ""
    for col in BENCH_EFFICIENCY_METRICS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    out = (df.groupby(keys, sort=False, dropna=False)
           .agg(n_runs=("method", "size"), **{m: (m, "mean") for m in BENCH_EFFICIENCY_METRICS})
           .reset_index())
    return sort_frame(add_ratios(out, keys, BENCH_EFFICIENCY_METRICS, reference))
