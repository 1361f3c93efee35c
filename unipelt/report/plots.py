"""Figures of the report: score against K, and learned gate values per layer.

Each function computes its data first and returns exactly what it drew, so tests (and notebooks) can check
numbers instead of pixels. Figures are built on `matplotlib.figure.Figure` (Agg canvas) without pyplot: no
global backend switch, no GUI, safe in worker processes.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .aggregate import method_sort_key, sort_tasks
from .tables import task_label

Series = dict[str, tuple[list[int], list[float], list[float]]]  # name -> (K values, mean ×100, std ×100)
GATE_ORDER = ("adapter_ffn", "prefix", "lora_query", "lora_value")
PLOT_FORMATS = ("png", "pdf")


def safe_name(name: str) -> str:
    """A file-name-safe version of a task name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Write `<stem>.png` and `<stem>.pdf`."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    paths = []
    for fmt in PLOT_FORMATS:
        path = stem.parent / f"{stem.name}.{fmt}"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths


def _int_k(k: Any) -> bool:
    return isinstance(k, (int, np.integer)) and not isinstance(k, bool)


# ---------------------------------------------------------------- score vs K
def score_vs_k_data(runs: pd.DataFrame, tasks: Sequence[str] | None = None) -> Series:
    """Per method (and model, when several): average over tasks of the per-task mean test score, for each
    integer K; "full" is left out (no position on a log K axis). The band is the sample std over seeds of the
    per-seed task average, using only seeds (data_seed, seed) present for every task of that method and K
    (0 when fewer than two such seeds). All values ×100, as in the tables.
    """
    df = runs[runs["k"].map(_int_k)]
    if tasks is not None:
        df = df[df["task"].isin(list(tasks))]
    multi_model = runs["model"].nunique() > 1
    series: Series = {}
    for (method, model), g in sorted(df.groupby(["method", "model"], sort=False),
                                     key=lambda item: (method_sort_key(item[0][0]), str(item[0][1]))):
        xs, ys, ss = [], [], []
        for k in sorted({int(v) for v in g["k"]}):
            gk = g[g["k"].map(lambda v: v == k)]
            ys.append(100 * float(gk.groupby("task")["test_score"].mean().mean()))
            per_seed = gk.assign(_d=gk["data_seed"].astype(str), _s=gk["seed"].astype(str)).pivot_table(
                index=["_d", "_s"], columns="task", values="test_score", aggfunc="mean").dropna()
            avg = per_seed.mean(axis=1)
            ss.append(100 * float(avg.std(ddof=1)) if len(avg) > 1 else 0.0)
            xs.append(k)
        series[f"{method} ({model})" if multi_model else str(method)] = (xs, ys, ss)
    return series


def _draw_score_vs_k(series: Series, title: str) -> Figure:
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for name, (xs, ys, ss) in series.items():
        y, s = np.asarray(ys), np.asarray(ss)
        dashed = name.split(" ")[0].endswith("_nogate")  # fixed-gate twins drawn dashed
        (line,) = ax.plot(xs, y, marker="o", linestyle="--" if dashed else "-", label=name)
        ax.fill_between(xs, y - s, y + s, color=line.get_color(), alpha=0.15, linewidth=0)
    ks = sorted({k for xs, _, _ in series.values() for k in xs})
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("K (training examples per task)")
    ax.set_ylabel("test score ×100")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def plot_score_vs_k(runs: pd.DataFrame, out_stem: str | Path | None = None,
                    tasks: Sequence[str] | None = None, title: str | None = None) -> Series:
    """Average score over tasks against K per method (±std band); writes `<out_stem>.png/.pdf` when given and
    there is anything to draw. Returns {series name: (K, mean, std)}."""
    series = score_vs_k_data(runs, tasks)
    if out_stem is not None and series:
        label = "average over tasks" if tasks is None or len(tasks) != 1 else task_label(tasks[0])
        save_figure(_draw_score_vs_k(series, title or f"Test score vs K ({label}; mean ± std over seeds)"),
                    Path(out_stem))
    return series


def plot_score_vs_k_per_task(runs: pd.DataFrame, out_dir: str | Path | None = None) -> dict[str, Series]:
    """One `score_vs_k_<task>.png/.pdf` per task; returns {task: series}."""
    out = {}
    for task in sort_tasks(runs["task"]):
        stem = Path(out_dir) / f"score_vs_k_{safe_name(task)}" if out_dir is not None else None
        series = plot_score_vs_k(runs, stem, tasks=[task])
        if series:
            out[task] = series
    return out


# ---------------------------------------------------------------- gates
def _gate_matrix(gates: dict[str, Any], submodules: list[str], n_layers: int) -> np.ndarray:
    m = np.full((len(submodules), n_layers), np.nan)
    for i, name in enumerate(submodules):
        try:
            values = np.asarray(gates.get(name, []), dtype=float).ravel()
        except (TypeError, ValueError):
            continue  # malformed entry: leave this submodule blank for this run
        m[i, : len(values)] = values[:n_layers]
    return m


def gate_data(runs: pd.DataFrame, preferred: str | None = None) -> dict[str, dict[str, Any]]:
    """Per task, the mean gate value per (submodule, layer) over runs of one gated method (all K pooled).

    The method is `preferred` when it has gate values for the task, else the gated method with most such runs.
    Returns {task: {"method", "submodules", "layers", "matrix" (submodules × layers), "n_runs"}}.
    """
    has_gates = runs["gates"].map(lambda g: isinstance(g, dict) and any(len(v or []) for v in g.values()
                                                                       if isinstance(v, (list, tuple))))
    out: dict[str, dict[str, Any]] = {}
    gated = runs[has_gates]
    for task in sort_tasks(gated["task"]):
        g = gated[gated["task"] == task]
        counts = g["method"].value_counts()
        method = preferred if preferred in counts.index else min(counts.index,
                                                                 key=lambda m: (-counts[m], method_sort_key(m)))
        gm = g[g["method"] == method]
        names = {name for gates in gm["gates"] for name in gates}
        submodules = [n for n in GATE_ORDER if n in names] + sorted(names - set(GATE_ORDER))
        n_layers = max(len(v) for gates in gm["gates"] for v in gates.values() if isinstance(v, (list, tuple)))
        stack = np.stack([_gate_matrix(gates, submodules, n_layers) for gates in gm["gates"]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
            matrix = np.nanmean(stack, axis=0)
        out[task] = {"method": method, "submodules": submodules, "layers": list(range(n_layers)),
                     "matrix": matrix, "n_runs": len(gm)}
    return out


def _draw_gates(task: str, d: dict[str, Any]) -> Figure:
    matrix = d["matrix"]
    n_sub, n_layers = matrix.shape
    fig = Figure(figsize=(max(4.0, 0.45 * n_layers + 2.5), max(2.0, 0.45 * n_sub + 1.4)))
    ax = fig.add_subplot()
    finite = matrix[np.isfinite(matrix)]
    in_unit = finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1)
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0 if in_unit else None, vmax=1 if in_unit else None)
    fig.colorbar(im, ax=ax, label="mean gate")
    ax.set_xticks(range(n_layers), [str(i) for i in d["layers"]])
    ax.set_yticks(range(n_sub), d["submodules"])
    ax.set_xlabel("layer")
    if matrix.size <= 120:
        for (i, j), v in np.ndenumerate(matrix):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if in_unit and v > 0.6 else "white")
    ax.set_title(f"{d['method']} on {task_label(task)}: mean gate per layer ({d['n_runs']} runs, all K)")
    return fig


def plot_gates(runs: pd.DataFrame, out_dir: str | Path | None = None,
               preferred: str | None = None) -> dict[str, dict[str, Any]]:
    """Heatmap per task (`gates_<task>.png/.pdf`) of `gate_data`; returns that data."""
    data = gate_data(runs, preferred)
    if out_dir is not None:
        for task, d in data.items():
            save_figure(_draw_gates(task, d), Path(out_dir) / f"gates_{safe_name(task)}")
    return data
