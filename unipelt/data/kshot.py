"""The low-resource protocol: K training examples and a held-out dev split, both drawn from GLUE train.

GLUE's own dev sets become the test sets and are never touched. The split depends only on
(n_train, k, data_seed, dev_size), so every method sees the same examples for the same data seed.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from unipelt.data.glue import DataError, load_split
from unipelt.data.tasks import TaskSpec, get_task

FULL = "full"


def kshot_indices(
    n_train: int,
    k: int | str,
    data_seed: int,
    dev_size: int = 1000,
    *,
    task_name: str | None = None,
) -> tuple[list[int], list[int]]:
    """Row positions (into the training split) of the K-shot train and dev splits.

    Rule: `perm = numpy.random.default_rng(data_seed).permutation(n_train)`.
    - int k: train = perm[:k], dev = perm[k:k + dev_size]; needs k + dev_size <= n_train.
      For one seed, a smaller K's train set is a prefix of a larger K's.
    - k == "full": dev = perm[:m] with m = min(dev_size, n_train // 10), train = perm[m:] (all the rest),
      so small tasks such as RTE keep 90% of their data for training.
    Both lists keep permutation order and are disjoint. `task_name` only improves error messages.
    """
    k = check_k(k)
    data_seed = check_data_seed(data_seed)
    if not _is_int(dev_size) or dev_size < 1:
        raise DataError(f"dev_size must be a positive integer, got {dev_size!r}")
    if not _is_int(n_train) or n_train < 0:
        raise DataError(f"n_train must be a non-negative integer, got {n_train!r}")
    what = task_name or "the training split"
    if k == FULL:
        n_dev = min(dev_size, n_train // 10)
        if n_dev < 1:
            raise DataError(f"k='full' holds out 10% of train as dev, but {what} has only {n_train} examples (need 10)")
    else:
        n_dev = dev_size
        if k + dev_size > n_train:
            largest = n_train - dev_size
            hint = f"the largest K is {largest}" if largest >= 1 else "no K fits; lower dev_size"
            raise DataError(
                f"K={k} plus a {dev_size}-example dev split needs {k + dev_size} training examples "
                f"but {what} has {n_train}; {hint}"
            )
    perm = np.random.default_rng(data_seed).permutation(n_train).tolist()
    if k == FULL:
        return perm[n_dev:], perm[:n_dev]
    return perm[:k], perm[k : k + dev_size]


def check_k(k: object) -> int | str:
    """Validate K: a positive integer or the string "full"."""
    if k == FULL or (_is_int(k) and k >= 1):
        return k if k == FULL else int(k)
    raise DataError(f"k must be a positive integer or 'full', got {k!r}")


def check_data_seed(data_seed: object) -> int:
    """Validate the data seed: a non-negative integer (numpy's generator rejects negative seeds)."""
    if _is_int(data_seed) and data_seed >= 0:
        return int(data_seed)
    raise DataError(f"data_seed must be a non-negative integer, got {data_seed!r}")


def split_hash(train_idx: list[int], dev_idx: list[int]) -> str:
    """sha256 hex of `{"train": [...], "dev": [...]}` (compact JSON of the GLUE `idx` values, in order)."""
    lists = {"train": [int(i) for i in train_idx], "dev": [int(i) for i in dev_idx]}
    payload = json.dumps(lists, separators=(",", ":"))
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


@dataclass
class TaskData:
    """Everything one run needs: K-shot train and dev (from GLUE train) and the untouched GLUE dev sets."""

    task: TaskSpec
    train: datasets.Dataset
    dev: datasets.Dataset
    test: dict[str, datasets.Dataset]
    split_hash: str
    k: int | str
    data_seed: int
    dev_size: int = field(default=1000)


def build_task_data(
    task: str | TaskSpec,
    k: int | str,
    data_seed: int,
    data_dir: str | Path | None = None,
    dev_size: int = 1000,
) -> TaskData:
    """Load train and the test splits of `task` and cut the K-shot train/dev splits (see kshot_indices).

    `data_dir=None` uses the HF hub. A missing local file raises MissingDataError naming it; train is
    loaded first, so tasks without a local train split fail on that file.
    """
    spec = get_task(task)
    k = check_k(k)
    data_seed = check_data_seed(data_seed)
    full_train = load_split(spec, spec.train_split, data_dir)
    train_pos, dev_pos = kshot_indices(len(full_train), k, data_seed, dev_size, task_name=spec.name)
    test = {name: load_split(spec, name, data_dir) for name in spec.test_splits}
    # Read idx as one numpy array: iterating a datasets Column row by row takes seconds on SST-2.
    all_idx = full_train.with_format("numpy")["idx"][:].tolist()
    return TaskData(
        task=spec,
        train=full_train.select(train_pos),
        dev=full_train.select(dev_pos),
        test=test,
        split_hash=split_hash([all_idx[p] for p in train_pos], [all_idx[p] for p in dev_pos]),
        k=k,
        data_seed=data_seed,
        dev_size=dev_size,
    )


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
