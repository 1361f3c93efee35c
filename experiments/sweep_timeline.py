"""Where a grouped sweep's wall time went, from its --log (one line per finished run; began_s, wall_s, worker).

    python experiments/sweep_timeline.py LOG.jsonl [--wall SECONDS]
Prints each worker's chain of jobs, the start-up (sweep start -> first job), the tail (from the moment the first
group worker ran out of work to the end) and how busy the group and solo workers were (share of the wall time
spent inside a job). Used for the one- against two-GPU comparison (issue 14).
"""
import argparse
import json


def jobs_of(path: str) -> list[dict]:
    jobs: dict[tuple, dict] = {}
    for line in open(path):
        row = json.loads(line)
        key = (row["worker"], row["began_s"])
        job = jobs.setdefault(key, {"worker": row["worker"], "device": row["device"], "began": row["began_s"],
                                    "wall": row["wall_s"], "size": row["group_size"], "task": row["overrides"][0]})
        job["end"] = job["began"] + job["wall"]
    return sorted(jobs.values(), key=lambda j: (j["worker"], j["began"]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("log")
    p.add_argument("--wall", type=float, default=None, help="the sweep's whole wall time (default: the last end)")
    a = p.parse_args()
    jobs = jobs_of(a.log)
    end = max(j["end"] for j in jobs)
    wall = a.wall or end
    workers = sorted({j["worker"] for j in jobs})
    group_workers = [w for w in workers if any(j["size"] > 1 for j in jobs if j["worker"] == w)]
    for w in workers:
        chain = [j for j in jobs if j["worker"] == w]
        print(f"worker {w:2d} {chain[0]['device']:7s} " + " ".join(
            f"[{j['began']:.0f}+{j['wall']:.0f} {j['size']}x{j['task'].split('=')[1]}]" for j in chain))
    first = min(j["began"] for j in jobs)
    idle_from = min(max(j["end"] for j in jobs if j["worker"] == w) for w in group_workers) if group_workers else end
    solo_workers = [w for w in workers if w not in group_workers]

    def busy(kind_workers: list[int]) -> float:
        """Share of the wall time these workers spent inside a job."""
        inside = sum(j["wall"] for j in jobs if j["worker"] in kind_workers)
        return inside / (wall * max(1, len(kind_workers)))

    print(f"start-up {first:.1f} s; last job ends at {end:.1f} s of {wall:.1f} s; tail {end - idle_from:.1f} s "
          f"(the first group worker ran out of work at {idle_from:.1f} s); group workers busy "
          f"{100 * busy(group_workers):.0f}% of the wall time, solo workers {100 * busy(solo_workers):.0f}%")


if __name__ == "__main__":
    main()
