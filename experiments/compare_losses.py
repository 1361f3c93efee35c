"""Are two per-step loss files the same? (`profile_group_gpu.py --losses FILE` from two packages on one device)

    python experiments/compare_losses.py OLD.json NEW.json [--label "fp32 stream, "]
Prints how many per-step losses are identical and the largest difference.
"""
import argparse
import json


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    old, new = (json.load(open(path)) for path in (args.old, args.new))
    steps = sum(len(v) for v in old.values())
    same = sum(a == b for r in old for a, b in zip(old[r], new.get(r, [])))
    largest = max(abs(a - b) for r in old for a, b in zip(old[r], new.get(r, [])))
    print(f"{args.label}per-step losses of {len(old)} runs: {same} of {steps} identical between the packages; "
          f"largest difference {largest:.3g}")


if __name__ == "__main__":
    main()
