"""Report layer: run records -> paper tables (Markdown/LaTeX/CSV), aggregate data files and figures.

Entry points: `unipelt-report` (cli.main), `build_report(runs_dir, out_dir)`, and
`efficiency_table_from_bench(rows, reference)` for the benchmark script. Names are resolved lazily so that
`python -m unipelt.report.cli` runs cleanly and reading records does not import matplotlib.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "build_report": "cli", "write_report": "cli", "main": "cli", "ReportError": "cli",
    "load_records": "records", "RecordSet": "records", "Skipped": "records",
    "Table": "tables", "efficiency_table_from_bench": "tables",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
