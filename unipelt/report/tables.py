"""Lay out report tables and render them as Markdown, LaTeX (booktabs) and CSV.

A `Table` is format-neutral (blocks of rows of `Cell`s plus the tidy frame behind it), so one builder serves all
three formats and the CSV always holds the unrounded numbers the table was drawn from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import aggregate as A
from .records import Skipped

TASK_LABELS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
               "qnli": "QNLI", "rte": "RTE"}
AVG_LABEL = "Avg"
MISSING = "–"
FLAG_MARK = "*"
PARTIAL_MARK = "†"
FORMATS = ("md", "tex", "csv")


def task_label(task: str) -> str:
    return TASK_LABELS.get(task, task)


def k_label(k: Any) -> str:
    return "Full data" if k == "full" else f"K = {k}"


# ---------------------------------------------------------------- table model
@dataclass
class Cell:
    """One table cell: a main value (the part that gets bold), secondary text, and footnote marks."""

    text: str = MISSING
    extra: str = ""
    bold: bool = False
    marks: str = ""


@dataclass
class Block:
    title: str | None
    rows: list[tuple[str, list[Cell]]] = field(default_factory=list)


@dataclass
class Table:
    title: str
    header: list[str]
    blocks: list[Block]
    frame: pd.DataFrame
    notes: list[tuple[str, str]] = field(default_factory=list)  # (mark, text); mark may be ""
    align: str | None = None  # LaTeX column spec; default "l" then "r" per column

    @property
    def ncols(self) -> int:
        return len(self.header)

    def to_markdown(self) -> str:
        return render_markdown(self)

    def to_latex(self) -> str:
        return render_latex(self)

    def to_csv(self) -> str:
        return self.frame.to_csv(index=False)

    def to_html(self) -> str:
        return render_html(self)

    def write(self, out_dir: str | Path, stem: str, formats: Sequence[str] = FORMATS) -> dict[str, Path]:
        """Write `<stem>.<fmt>` for each format; returns {file name: path}."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        render = {"md": self.to_markdown, "tex": self.to_latex, "csv": self.to_csv}
        written = {}
        for fmt in formats:
            path = out_dir / f"{stem}.{fmt}"
            path.write_text(render[fmt](), encoding="utf-8")
            written[path.name] = path
        return written


# ---------------------------------------------------------------- rendering
def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_mark(mark: str) -> str:
    """A footnote mark at the start of a list item must not read as emphasis."""
    return mark.replace("*", "\\*")


def _md_cell(c: Cell) -> str:
    main = f"**{c.text}**" if c.bold and c.text != MISSING else c.text
    return _md_escape(" ".join(p for p in (main, c.extra) if p) + c.marks)


def render_markdown(t: Table) -> str:
    """GitHub-flavoured Markdown: a heading, one padded pipe table per block, then the footnotes."""
    spec = t.align or "l" + "r" * (t.ncols - 1)
    lines = [f"### {t.title}", ""]
    for block in t.blocks:
        if block.title:
            lines += [f"**{block.title}**", ""]
        grid = [[_md_escape(h) for h in t.header]] + [[_md_escape(label)] + [_md_cell(c) for c in cells]
                                                      for label, cells in block.rows]
        widths = [max(3, *(len(row[i]) for row in grid)) for i in range(t.ncols)]

        def fmt(row: list[str]) -> str:
            return "| " + " | ".join(v.ljust(w) if a == "l" else v.rjust(w)
                                     for v, w, a in zip(row, widths, spec)) + " |"

        rule = "|" + "|".join(":" + "-" * (w + 1) if a == "l" else "-" * (w + 1) + ":"
                              for w, a in zip(widths, spec)) + "|"
        lines += [fmt(grid[0]), rule] + [fmt(r) for r in grid[1:]] + [""]
    for mark, text in t.notes:
        lines.append(f"- {_md_mark(mark)} {text}" if mark else f"- {text}")
    return "\n".join(lines).rstrip() + "\n"


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "–": "--", "×": r"$\times$", "Δ": r"$\Delta$", "−": "$-$", "·": r"$\cdot$", "±": r"$\pm$",
                "†": r"$^{\dagger}$"}
_TEX_MARKS = {"*": "*", "†": r"\dagger"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


def _tex_marks(marks: str) -> str:
    return "".join(f"$^{{{_TEX_MARKS.get(m, tex_escape(m))}}}$" for m in marks)


def _tex_cell(c: Cell) -> str:
    main = tex_escape(c.text)
    if c.bold and c.text != MISSING:
        main = rf"\textbf{{{main}}}"
    return " ".join(p for p in (main, tex_escape(c.extra)) if p) + _tex_marks(c.marks)


def render_latex(t: Table) -> str:
    """A booktabs tabular (no float, so it can be \\input into any table environment); blocks are separated by
    \\midrule and titled by a \\multicolumn row; footnotes go in a last \\multicolumn row."""
    spec = t.align or "l" + "r" * (t.ncols - 1)
    lines = [f"% {t.title} (generated by unipelt-report; needs \\usepackage{{booktabs}})",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(tex_escape(h) for h in t.header) + r" \\"]
    for block in t.blocks:
        lines.append(r"\midrule")
        if block.title:
            lines.append(rf"\multicolumn{{{t.ncols}}}{{l}}{{\textit{{{tex_escape(block.title)}}}}} \\")
        for label, cells in block.rows:
            lines.append(" & ".join([tex_escape(label)] + [_tex_cell(c) for c in cells]) + r" \\")
    lines.append(r"\bottomrule")
    if t.notes:
        note = " ".join((_tex_marks(m) + " " if m else "") + tex_escape(text) for m, text in t.notes)
        lines.append(rf"\multicolumn{{{t.ncols}}}{{l}}{{\footnotesize {note}}} \\")
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"


def _html_cell(c: Cell) -> str:
    from html import escape

    main = escape(c.text)
    if c.bold and c.text != MISSING:
        main = f"<strong>{main}</strong>"
    extra = f' <span class="std">{escape(c.extra)}</span>' if c.extra else ""
    marks = f"<sup>{escape(c.marks)}</sup>" if c.marks else ""
    return main + extra + marks


def render_html(t: Table) -> str:
    """One <section>: the title, a <table> per block (block title as caption), then the footnotes."""
    from html import escape

    spec = t.align or "l" + "r" * (t.ncols - 1)
    cls = {"l": "l", "r": "r", "c": "c"}
    out = [f"<section class=\"table\"><h2>{escape(t.title)}</h2>"]
    for block in t.blocks:
        out.append("<table>")
        if block.title:
            out.append(f"<caption>{escape(block.title)}</caption>")
        out.append("<thead><tr>" + "".join(f'<th class="{cls.get(a, "l")}">{escape(h)}</th>'
                                           for h, a in zip(t.header, spec)) + "</tr></thead><tbody>")
        for label, cells in block.rows:
            tds = "".join(f'<td class="{cls.get(a, "r")}">{_html_cell(c)}</td>' for c, a in zip(cells, spec[1:]))
            out.append(f'<tr><th class="l" scope="row">{escape(label)}</th>{tds}</tr>')
        out.append("</tbody></table>")
    if t.notes:
        out.append('<ul class="notes">' + "".join(f"<li>{escape(m + ' ' if m else '')}{escape(text)}</li>"
                                                  for m, text in t.notes) + "</ul>")
    out.append("</section>")
    return "\n".join(out)


# ---------------------------------------------------------------- number formatting
def _isnum(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def pct(x: float) -> str:
    """A score on the ×100 scale with one decimal (no "-0.0")."""
    s = f"{100 * x:.1f}"
    return "0.0" if s == "-0.0" else s


def signed_pct(x: float) -> str:
    s = f"{100 * x:+.1f}"
    return "±0.0" if s in ("+0.0", "-0.0") else s.replace("-", "−")


def count(x: float) -> str:
    """Parameter counts the way papers print them: 1.23M, 98.3K."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}" if abs(x) < 10 * div else f"{x / div:.1f}{suffix}"
    return f"{x:.0f}"


def num(x: float) -> str:
    """About three significant digits, never scientific notation for the usual ranges."""
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 0.01 or ax == 0:
        return f"{x:.2f}"
    return f"{x:.2g}"


def ratio(x: float) -> str:
    return f"({num(x)}×)"


def _mark_best(cells: list[Cell], eligible: list[bool] | None = None) -> None:
    """Bold the cells with the highest displayed value (ties at the displayed precision are all bold)."""
    eligible = eligible or [True] * len(cells)
    vals = [float(c.text) for c, ok in zip(cells, eligible) if ok and c.text != MISSING]
    if not vals:
        return
    best = max(vals)
    for c, ok in zip(cells, eligible):
        c.bold = ok and c.text != MISSING and float(c.text) == best


def _bold_columns(rows: list[tuple[str, list[Cell]]], partial_avg: list[bool] | None = None) -> None:
    if not rows:
        return
    ncells = len(rows[0][1])
    for j in range(ncells):
        column = [cells[j] for _, cells in rows]
        eligible = None
        if j == ncells - 1 and partial_avg is not None and not all(partial_avg):
            eligible = [not p for p in partial_avg]  # a subset average is not comparable: not a candidate
        _mark_best(column, eligible)


def _score_cell(mean: float, std: float, flagged: bool, n: Any = None) -> Cell:
    """mean (std); a single run (n == 1) has no spread to show, so its cell is the mean alone."""
    single = n is not None and not pd.isna(n) and int(n) == 1
    return Cell(pct(mean), "" if single else f"({pct(std)})", marks=FLAG_MARK if flagged else "")


def _block_title(k: Any, model: str, multi_model: bool) -> str:
    return k_label(k) + (f" · {model}" if multi_model else "")


# ---------------------------------------------------------------- builders
def main_table(agg: pd.DataFrame, expected_seeds: int = A.DEFAULT_EXPECTED_SEEDS) -> Table:
    """Methods × (tasks + Avg), one block per K (and model): mean (std) ×100, best per column in bold."""
    tasks = A.sort_tasks(agg["task"])
    avgs = A.method_averages(agg)
    multi_model = agg["model"].nunique() > 1
    blocks, used = [], set()
    for k, model in A.blocks(agg):
        blk = A.block_frame(agg, k, model)
        by = {(r.method, r.task): r for r in blk.itertuples()}
        rows, partial = [], []
        for method in A.sort_methods(blk["method"]):
            cells = [_score_cell(r.mean, r.std, r.flagged, r.n) if (r := by.get((method, t))) is not None else Cell()
                     for t in tasks]
            a = A.block_frame(avgs, k, model)
            a = a[a["method"] == method].iloc[0]
            cells.append(Cell(pct(a["avg"]), marks=PARTIAL_MARK if a["partial"] else ""))
            used |= {m for c in cells for m in c.marks}
            rows.append((method, cells))
            partial.append(bool(a["partial"]))
        _bold_columns(rows, partial)
        blocks.append(Block(_block_title(k, model, multi_model), rows))
    notes = [("", "Test score ×100, mean (std) over seeds; best mean per column in bold.")]
    if FLAG_MARK in used:
        notes.append((FLAG_MARK, f"fewer than {expected_seeds} seeds."))
    if PARTIAL_MARK in used:
        notes.append((PARTIAL_MARK, "average over a subset of the tasks (method lacks some task of this K)."))
    return Table("Main results", ["Method"] + [task_label(t) for t in tasks] + [AVG_LABEL], blocks,
                 frame=agg[A.AGG_COLUMNS].reset_index(drop=True), notes=notes)


def _comparison_cells(rows: pd.DataFrame, tasks: list[str], kind: str) -> list[Cell]:
    """Cells of one row of a headline/ablation frame: scores, differences, or upper bounds (with winner)."""
    by = {r.task: r for r in rows.itertuples()}
    cells = []
    for task in tasks + ["avg"]:
        r = by.get(task)
        if r is None:
            cells.append(Cell())
        elif kind == "diff":
            cells.append(Cell(signed_pct(r.value), marks=PARTIAL_MARK if r.partial else ""))
        elif task == "avg":
            cells.append(Cell(pct(r.value), marks=PARTIAL_MARK if r.partial else ""))
        elif kind == "upper":
            cells.append(Cell(pct(r.value), f"[{r.method}]", marks=FLAG_MARK if r.flagged else ""))
        else:
            cells.append(_score_cell(r.value, r.std, r.flagged, r.n))
    return cells


def _comparison_notes(blocks: list[Block], expected_seeds: int, first: str) -> list[tuple[str, str]]:
    used = {m for b in blocks for _, cells in b.rows for c in cells for m in c.marks}
    notes = [("", first)]
    if FLAG_MARK in used:
        notes.append((FLAG_MARK, f"fewer than {expected_seeds} seeds."))
    if PARTIAL_MARK in used:
        notes.append((PARTIAL_MARK, "over a subset of the tasks."))
    return notes


def _paired_table(frame: pd.DataFrame, title: str, first: str, expected_seeds: int, block_rows) -> Table:
    """A comparison table of `frame` (aggregate's row/method/task/value frames): one block per (K, model), whose rows
    `block_rows(blk)` gives as (label, the frame's rows of that table row, cell kind)."""
    tasks = A.sort_tasks(frame.loc[frame["task"] != "avg", "task"])
    multi_model = frame["model"].nunique() > 1
    blocks = []
    for k, model in A.blocks(frame):
        rows = [(label, _comparison_cells(part, tasks, kind))
                for label, part, kind in block_rows(A.block_frame(frame, k, model)) if not part.empty]
        blocks.append(Block(_block_title(k, model, multi_model), rows))
    return Table(title, ["Method"] + [task_label(t) for t in tasks] + [AVG_LABEL], blocks,
                 frame=frame.reset_index(drop=True), notes=_comparison_notes(blocks, expected_seeds, first))


def headline_table(head: pd.DataFrame, gated: str = A.DEFAULT_GATED,
                   expected_seeds: int = A.DEFAULT_EXPECTED_SEEDS) -> Table:
    """Render `aggregate.headline`: gated method, best single method, per-task upper bound, and differences."""
    labels = {"gated": None, "best_single": None, "diff_best_single": "Δ vs best single",
              "upper_bound": "upper bound (best single per task)", "diff_upper_bound": "Δ vs upper bound"}
    kinds = {"diff_best_single": "diff", "diff_upper_bound": "diff", "upper_bound": "upper"}

    def block_rows(blk):
        for row, label in labels.items():
            part = blk[blk["row"] == row]
            if label is None and not part.empty:
                label = f"{part['method'].iloc[0]} ({'gated' if row == 'gated' else 'best single'})"
            yield label, part, kinds.get(row, "score")

    first = (f"Test score ×100, mean (std) over seeds. Δ = {gated} − baseline. Upper bound: best single method per "
             "task [winner].")
    if head.empty:
        first = f"No data: {gated} or the single methods are missing from the records."
    return _paired_table(head, f"Headline: {gated} vs single methods", first, expected_seeds, block_rows)


def ablation_table(abl: pd.DataFrame, expected_seeds: int = A.DEFAULT_EXPECTED_SEEDS) -> Table:
    """Render `aggregate.ablation`: each UniPELT subset with learned gates, with fixed gates, and the gain."""
    def block_rows(blk):
        for method in A.sort_methods(blk.loc[blk["row"] == "gated", "method"].tolist()
                                     + [m[: -len(A.NOGATE_SUFFIX)] for m in blk.loc[blk["row"] == "fixed", "method"]]):
            for row, kind in (("gated", "score"), ("fixed", "score"), ("delta_gate", "diff")):
                name = method + A.NOGATE_SUFFIX if row == "fixed" else method
                label = f"Δ gate ({method})" if row == "delta_gate" else name
                yield label, blk[(blk["row"] == row) & (blk["method"] == name)], kind

    first = "Test score ×100, mean (std) over seeds; _nogate = fixed gates. Δ gate = gated − fixed."
    if abl.empty:
        first = "No data: no unipelt_* methods in the records."
    return _paired_table(abl, "Ablation: learned vs fixed gates", first, expected_seeds, block_rows)


def sweep_comparison_table(cmp: pd.DataFrame, this: str = "this", other: str = "other",
                           expected_seeds: int = A.DEFAULT_EXPECTED_SEEDS,
                           paired: tuple[int, int] | None = None) -> Table:
    """Render `aggregate.sweep_comparison`: per method, this sweep's mean (std), the other's, and Δ. `paired`:
    `aggregate.paired_runs`, stated in a note."""
    def block_rows(blk):
        for method in A.sort_methods(blk["method"].unique()):
            for row, label, kind in (("this", f"{method} ({this})", "score"),
                                     ("other", f"{method} ({other})", "score"), ("diff", f"Δ {method}", "diff")):
                yield label, blk[(blk["row"] == row) & (blk["method"] == method)], kind

    first = f"Test score ×100, mean (std) over seeds. Δ = {this} − {other}, per task and on the average."
    if paired is not None:
        first += (f" {paired[0]} runs are in both sweeps (same task, method, model, K, data seed and seed); "
                  f"{paired[1]} of them have the same test score.")
    if cmp.empty:
        first = "No data: the two sweeps share no (K, model, method, task) cell."
    return _paired_table(cmp, f"Sweep comparison: {this} vs {other}", first, expected_seeds, block_rows)


_EFF_COLUMNS = {  # column -> (header, formatter)
    "trainable": ("Trainable", count),
    "percent": ("%", lambda v: f"{num(v)}%"),
    "train_epoch_s": ("Epoch (s)", num),
    "train_step_ms": ("Step (ms)", num),
    "infer_ms": ("Infer (ms)", num),
    "peak_mem_mib": ("Peak mem (MiB)", num),
    "peak_mem_mb": ("Peak mem (MiB)", num),
}


def _efficiency_render(eff: pd.DataFrame, keys: list[str], metrics: Sequence[str], reference: str,
                       title: str, notes: list[tuple[str, str]]) -> Table:
    has_ref = (eff["method"] == reference).any()
    header = ["Method"] + [k.capitalize() for k in keys if k != "method"] + ["Runs"] + \
             [_EFF_COLUMNS[m][0] for m in metrics]
    rows = []
    for r in eff.to_dict("records"):
        cells = [Cell(str(r[k])) for k in keys if k != "method"] + [Cell(str(int(r["n_runs"])))]
        for m in metrics:
            v, fmt = r[m], _EFF_COLUMNS[m][1]
            rv = r.get(f"{m}_ratio")
            cells.append(Cell(fmt(v), ratio(rv) if has_ref and _isnum(rv) else "") if _isnum(v) else Cell())
        rows.append((str(r["method"]), cells))
    if has_ref:
        notes = notes + [("", f"(n×) = relative to {reference} with the same {', '.join(k for k in keys if k != 'method')}.")]
    align = "l" + "l" * (len(keys) - 1) + "r" * (len(header) - len(keys))
    return Table(title, header, [Block(None, rows)], frame=eff.reset_index(drop=True), notes=notes, align=align)


def efficiency_table(eff: pd.DataFrame, reference: str = A.REFERENCE_METHOD, k: Any = None) -> Table:
    """Render `aggregate.efficiency` (from run records)."""
    scope = "all K pooled; epoch time grows with K" if k is None else k_label(k)
    notes = [("", f"Means over runs ({scope}). Infer = inference time per example.")]
    return _efficiency_render(eff, ["method", "model"], A.RECORD_EFFICIENCY_METRICS, reference,
                              "Efficiency", notes)


def efficiency_table_from_bench(rows: list[dict[str, Any]], reference: str = A.REFERENCE_METHOD) -> Table:
    """The efficiency table from benchmark rows {method, model, dtype, batch, trainable, percent, train_step_ms,
    infer_ms, peak_mem_mb}; ratios are to `reference` at the same model/dtype/batch.

    Returns a `Table`: call `.to_markdown()`, `.to_latex()`, `.to_csv()` or `.write(out_dir, stem)`.
    """
    eff = A.efficiency_from_bench(rows, reference)
    return _efficiency_render(eff, ["method", "model", "dtype", "batch"], A.BENCH_EFFICIENCY_METRICS, reference,
                              "Efficiency (benchmark)", [("", "Means over repeats.")])


FAILED_COLUMNS = ["run_id", "task", "method", "k", "seed", "error", "step"]


def failed_table(failed: Sequence[dict[str, Any]]) -> Table:
    """Failed runs, listed apart: they never enter the aggregates."""
    recs = []
    for rec in failed:
        failure = rec.get("failure") if isinstance(rec.get("failure"), dict) else {}
        recs.append({"run_id": rec.get("run_id") or "", "task": rec["task"], "method": rec["method"],
                     "k": rec["k"], "seed": rec.get("seed"), "error": str(failure.get("error") or ""),
                     "step": failure.get("step")})
    frame = pd.DataFrame(recs, columns=FAILED_COLUMNS)
    rows = []
    for r in recs:
        error = " ".join(r["error"].split())
        error = error if len(error) <= 100 else error[:99] + "…"
        rows.append((r["run_id"] or MISSING, [Cell(r["task"]), Cell(r["method"]), Cell(str(r["k"])),
                                              Cell(str(r["seed"]) if r["seed"] is not None else MISSING),
                                              Cell(error or MISSING),
                                              Cell(str(r["step"]) if r["step"] is not None else MISSING)]))
    notes = [] if recs else [("", "No failed runs.")]
    return Table("Failed runs", FAILED_COLUMNS, [Block(None, rows)], frame=frame, notes=notes, align="lllrrlr")


def skipped_table(skipped: Sequence[Skipped], root: str | Path | None = None) -> Table:
    """Files that were not used and why."""
    def rel(p: Path) -> str:
        try:
            return str(Path(p).relative_to(root)) if root is not None else str(p)
        except ValueError:
            return str(p)

    frame = pd.DataFrame([{"path": rel(s.path), "reason": s.reason} for s in skipped], columns=["path", "reason"])
    rows = [(r.path, [Cell(r.reason)]) for r in frame.itertuples()]
    return Table("Skipped files", ["path", "reason"], [Block(None, rows)], frame=frame, align="ll",
                 notes=[] if rows else [("", "No skipped files.")])
