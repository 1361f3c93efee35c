"""Do two runs folders hold the same runs with the same results? (issue 14: one GPU against two)

    python experiments/compare_records.py RUNS_A RUNS_B
Prints the counts and every run whose metrics or dev score differ; exits 1 if any differ or are missing.
"""
import json
import sys
from pathlib import Path


def results(folder: str) -> dict[str, dict]:
    out = {}
    for path in Path(folder).glob("*/record.json"):
        record = json.loads(path.read_text())
        out[path.parent.name] = {"status": record.get("status"), "metrics": record.get("metrics"),
                                 "dev_score": record.get("dev_score"), "test_score": record.get("test_score"),
                                 "best_epoch": record.get("best_epoch"), "epochs_run": record.get("epochs_run")}
    return out


def main(a: str, b: str) -> int:
    ra, rb = results(a), results(b)
    both = sorted(set(ra) & set(rb))
    differ = [rid for rid in both if ra[rid] != rb[rid]]
    print(f"records: {len(ra)} in {a}, {len(rb)} in {b}, {len(both)} in both, {len(both) - len(differ)} identical")
    for rid in differ:
        print(f"  differs: {rid}: {ra[rid]} vs {rb[rid]}")
    for rid in sorted(set(ra) ^ set(rb)):
        print(f"  only in {'the first' if rid in ra else 'the second'}: {rid}")
    return 1 if differ or set(ra) != set(rb) else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
