"""`unipelt-report RUNS_DIR --out REPORT_DIR`: every table and figure of the paper from a folder of run records."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import aggregate as A
from . import plots as figures
from . import tables as T
from .records import RecordSet, load_records

DEFAULT_OUT = Path("reports")
MAX_LISTED = 50  # skipped files printed to the console; all of them go to skipped.csv


class ReportError(Exception):
    """The runs folder cannot produce a report (missing, or no complete records)."""


def write_report(rs: RecordSet, out_dir: str | Path, *, expected_seeds: int = A.DEFAULT_EXPECTED_SEEDS,
                 gated: str = A.DEFAULT_GATED, formats: Sequence[str] = T.FORMATS, plots: bool = True,
                 singles: Sequence[str] = A.SINGLE_METHODS, efficiency_k: Any = None,
                 html: bool = False, compare: RecordSet | None = None,
                 labels: tuple[str, str] = ("this", "other")) -> dict[str, Path]:
    """Write all tables, data files and figures for already-loaded records; returns {file name: path}.
    `html`: also report.html, every table and figure on one self-contained page (report/html.py).
    `compare`: another sweep's records; adds compare.* (these means against its means, cell by cell), the two
    sweeps named by `labels`."""
    if not rs.records:
        raise ReportError(f"no complete run records under {rs.root} "
                          f"({len(rs.skipped)} file(s) skipped, {len(rs.failed)} failed run(s))")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = A.runs_frame(rs.records)
    agg = A.aggregate(runs, expected_seeds)
    written: dict[str, Path] = {}
    eff_formats = [f for f in formats if f != "tex"]  # efficiency is a md/csv table (see tables.efficiency_table)
    tables = [  # (table, file stem, formats)
        (T.main_table(agg, expected_seeds), "main_table", formats),
        (T.headline_table(A.headline(agg, gated, singles), gated, expected_seeds), "headline", formats),
        (T.ablation_table(A.ablation(agg), expected_seeds), "ablation", formats),
        (T.efficiency_table(A.efficiency(runs, k=efficiency_k), k=efficiency_k), "efficiency", eff_formats),
        (T.failed_table(rs.failed), "failed_runs", eff_formats),
        (T.skipped_table(rs.skipped, rs.root), "skipped", ["csv"]),
    ]
    if compare is not None:
        other = A.aggregate(A.runs_frame(compare.records), expected_seeds)
        table = T.sweep_comparison_table(A.sweep_comparison(agg, other), *labels, expected_seeds=expected_seeds,
                                         paired=A.paired_runs(rs.records, compare.records))
        tables.append((table, "compare", formats))
    for table, stem, fmts in tables:
        written |= table.write(out, stem, fmts)

    (out / "aggregate.json").write_text(agg.to_json(orient="records", indent=1, double_precision=15), encoding="utf-8")
    # Arrow needs one type per column: K (100 | "full") is stored as text; A.normalize_k_column undoes it.
    agg.assign(k=agg["k"].astype(str)).to_parquet(out / "aggregate.parquet", index=False)
    written |= {"aggregate.json": out / "aggregate.json", "aggregate.parquet": out / "aggregate.parquet"}

    if plots:
        stems = []
        if figures.plot_score_vs_k(runs, out / "score_vs_k"):
            stems.append("score_vs_k")
        stems += [f"score_vs_k_{figures.safe_name(t)}" for t in figures.plot_score_vs_k_per_task(runs, out)]
        stems += [f"gates_{figures.safe_name(t)}" for t in figures.plot_gates(runs, out, preferred=gated)]
        written |= {f"{s}.{fmt}": out / f"{s}.{fmt}" for s in stems for fmt in figures.PLOT_FORMATS}
    if html:
        from .html import HTML_FILE, write_page

        pngs = [(name[: -len(".png")].replace("_", " "), path) for name, path in written.items()
                if name.endswith(".png")]
        meta = [f"{len(rs.records)} complete run record(s) from {rs.root}; {len(rs.skipped)} file(s) skipped; "
                f"{len(rs.failed)} failed run(s)."]
        written[HTML_FILE] = write_page(out, "unipelt report", [t for t, _, _ in tables], pngs, meta)
    return written


def build_report(runs_dir: str | Path, out_dir: str | Path | None = None, **options: Any) -> dict[str, Path]:
    """Read `runs_dir` and write the report into `out_dir` (default ./reports). Options: see `write_report`.

    Raises ReportError when `runs_dir` is missing or holds no complete records.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ReportError(f"runs directory {runs_dir} does not exist")
    return write_report(load_records(runs_dir), DEFAULT_OUT if out_dir is None else out_dir, **options)


def _formats(value: str) -> list[str]:
    fmts = [f.strip() for f in value.split(",") if f.strip()]
    bad = [f for f in fmts if f not in T.FORMATS]
    if bad or not fmts:
        raise argparse.ArgumentTypeError(f"unknown format(s) {bad or value!r}; choose from {','.join(T.FORMATS)}")
    return fmts


def _k(value: str) -> int | str:
    if value == "full":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"K must be an integer or 'full', got {value!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unipelt-report",
        description="Aggregate run records (RUNS_DIR/**/record.json, or any *.json with schema_version) into "
                    "UniPELT-paper tables (main, headline, ablation, efficiency, failed runs) as Markdown/LaTeX/"
                    "CSV, aggregate.json/.parquet, and figures (score_vs_k, score_vs_k_<task>, gates_<task>; "
                    "PNG+PDF). CSV/JSON/parquet hold raw scores (records' scale); tables show ×100.",
        epilog="score_vs_k plots integer K on a log axis; K='full' runs appear in the tables only. "
               "Exit status: 0 on success, 2 if RUNS_DIR is missing or holds no complete records.")
    p.add_argument("runs_dir", metavar="RUNS_DIR", type=Path, help="folder searched recursively for run records")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output folder (default: ./reports, created if needed; files are overwritten)")
    p.add_argument("--expected-seeds", type=int, default=A.DEFAULT_EXPECTED_SEEDS,
                   help="groups with fewer runs are marked * (default: %(default)s)")
    p.add_argument("--gated", default=A.DEFAULT_GATED,
                   help="gated combination of the headline table and gate heatmaps (default: %(default)s)")
    p.add_argument("--singles", type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                   default=list(A.SINGLE_METHODS),
                   help="comma-separated single methods for the headline baselines "
                        f"(default: {','.join(A.SINGLE_METHODS)})")
    p.add_argument("--formats", type=_formats, default=list(T.FORMATS),
                   help="table formats, comma separated from md,tex,csv (default: md,tex,csv)")
    p.add_argument("--efficiency-k", type=_k, default=None,
                   help="only use runs of this K for the efficiency table (default: all runs pooled)")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    p.add_argument("--html", action="store_true",
                   help="also write OUT/report.html: every table and figure on one self-contained page")
    p.add_argument("--compare-with", metavar="OTHER_RUNS_DIR", type=Path, default=None,
                   help="another sweep's runs folder: also write OUT/compare.* with this sweep's means against its "
                        "means per (K, method, task) and the difference")
    p.add_argument("--labels", type=_labels, default=None,
                   help="names of the two sweeps in compare.*, THIS,OTHER (default: the folders' names, or their "
                        "parents' where a folder is called runs)")
    return p


def _sweep_name(runs_dir: Path) -> str:
    """A sweep's name for a table: its folder's, or the parent's where the folder is just `runs`."""
    path = runs_dir.resolve()
    return path.parent.name if path.name == "runs" else path.name


def _labels(value: str) -> tuple[str, str]:
    parts = [s.strip() for s in value.split(",")]
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"--labels takes two names, THIS,OTHER; got {value!r}")
    return parts[0], parts[1]


def _summary(rs: RecordSet, agg_flagged: int | None, expected: int) -> list[str]:
    lines = [f"Read {len(rs.records)} complete run record(s) from {rs.root}; "
             f"{len(rs.skipped)} file(s) skipped; {len(rs.failed)} failed run(s)."]
    for s in rs.skipped[:MAX_LISTED]:
        lines.append(f"  skipped {s.path}: {s.reason}")
    if len(rs.skipped) > MAX_LISTED:
        lines.append(f"  ... and {len(rs.skipped) - MAX_LISTED} more (see skipped.csv)")
    for rec in rs.failed:
        failure = rec.get("failure") if isinstance(rec.get("failure"), dict) else {}
        lines.append(f"  failed  {rec.get('run_id') or rec['_path']}: {failure.get('error', '?')} "
                     f"(step {failure.get('step', '?')})")
    if agg_flagged:
        lines.append(f"{agg_flagged} group(s) have fewer than {expected} seeds (marked *).")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.runs_dir.is_dir():
        print(f"unipelt-report: error: runs directory {args.runs_dir} does not exist", file=sys.stderr)
        return 2
    rs = load_records(args.runs_dir)
    if not rs.records:
        print("\n".join(_summary(rs, None, args.expected_seeds)), file=sys.stderr)
        print(f"unipelt-report: error: no valid run records under {args.runs_dir}", file=sys.stderr)
        return 2
    compare = None
    if args.compare_with is not None:  # checked before anything is written
        compare = load_records(args.compare_with) if args.compare_with.is_dir() else None
        if compare is None or not compare.records:
            why = "does not exist" if compare is None else "holds no complete run records"
            print(f"unipelt-report: error: --compare-with {args.compare_with} {why}", file=sys.stderr)
            return 2
    labels = args.labels or (_sweep_name(args.runs_dir), _sweep_name(args.compare_with) if compare else "other")
    written = write_report(rs, args.out, expected_seeds=args.expected_seeds, gated=args.gated,
                           formats=args.formats, plots=not args.no_plots, singles=args.singles,
                           efficiency_k=args.efficiency_k, html=args.html, compare=compare, labels=labels)
    agg = A.aggregate(A.runs_frame(rs.records), args.expected_seeds)
    print(T.main_table(agg, args.expected_seeds).to_markdown())
    print("\n".join(_summary(rs, int(agg["flagged"].sum()), args.expected_seeds)))
    print(f"Wrote {len(written)} file(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
