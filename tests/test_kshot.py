"""The K-shot protocol: deterministic, disjoint splits of GLUE train; GLUE dev untouched as test."""

from __future__ import annotations

import gzip
import hashlib
import json

import datasets
import numpy as np
import pytest

from unipelt.data.glue import DataError, MissingDataError, default_data_dir, load_split
from unipelt.data.kshot import TaskData, build_task_data, kshot_indices, split_hash
from unipelt.data.tasks import get_task

GLUE_DIR = default_data_dir()
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"local GLUE data not found at {GLUE_DIR}")


# --- kshot_indices (pure) ---------------------------------------------------------------------------


def test_same_inputs_same_ids_and_exact_rule():
    train, dev = kshot_indices(2490, 16, 111)
    assert (train, dev) == kshot_indices(2490, 16, 111)
    perm = np.random.default_rng(111).permutation(2490).tolist()
    assert train == perm[:16] and dev == perm[16:1016]


def test_different_seeds_give_different_ids():
    a = kshot_indices(2490, 100, 1)
    b = kshot_indices(2490, 100, 2)
    assert set(a[0]) != set(b[0]) and set(a[1]) != set(b[1])


@pytest.mark.parametrize("k", [1, 16, 100, 1000, 1490])
def test_sizes_exact_disjoint_in_range(k):
    train, dev = kshot_indices(2490, k, 7)
    assert len(train) == k and len(dev) == 1000
    assert len(set(train)) == k and len(set(dev)) == 1000
    assert not set(train) & set(dev)
    assert all(0 <= i < 2490 for i in train + dev)
    assert all(type(i) is int for i in train + dev)


def test_smaller_k_is_prefix_of_larger_k():
    assert kshot_indices(5000, 100, 3)[0] == kshot_indices(5000, 500, 3)[0][:100]


def test_custom_dev_size():
    train, dev = kshot_indices(300, 50, 0, dev_size=200)
    assert len(train) == 50 and len(dev) == 200 and not set(train) & set(dev)


@pytest.mark.parametrize(
    "n_train,n_dev",
    [(2490, 249), (3668, 366), (8551, 855), (10000, 1000), (67349, 1000), (10, 1), (19, 1)],
)
def test_full_rule_holds_out_min_1000_or_tenth(n_train, n_dev):
    train, dev = kshot_indices(n_train, "full", 5)
    perm = np.random.default_rng(5).permutation(n_train).tolist()
    assert dev == perm[:n_dev]
    assert train == perm[n_dev:]
    assert sorted(train + dev) == list(range(n_train))


def test_full_rule_respects_dev_size():
    train, dev = kshot_indices(67349, "full", 5, dev_size=500)
    assert len(dev) == 500 and len(train) == 67349 - 500


def test_full_needs_ten_examples():
    with pytest.raises(DataError, match="only 9 examples"):
        kshot_indices(9, "full", 0)


def test_k_too_large_message_has_the_numbers():
    with pytest.raises(DataError) as err:
        kshot_indices(2490, 5000, 1, task_name="rte")
    assert str(err.value) == (
        "K=5000 plus a 1000-example dev split needs 6000 training examples but rte has 2490; the largest K is 1490"
    )
    with pytest.raises(DataError, match="K=1491 .* needs 2491 .* has 2490; the largest K is 1490"):
        kshot_indices(2490, 1491, 1)
    with pytest.raises(DataError, match="no K fits"):
        kshot_indices(900, 1, 1)


@pytest.mark.parametrize("k", [0, -3, "abc", "100", 2.5, True, None, "FULL"])
def test_bad_k_is_named(k):
    with pytest.raises(DataError) as err:
        kshot_indices(2490, k, 1)
    assert f"got {k!r}" in str(err.value)
    assert "positive integer or 'full'" in str(err.value)


@pytest.mark.parametrize("seed", [-1, 1.5, "1", None, False])
def test_bad_seed_is_named(seed):
    with pytest.raises(DataError) as err:
        kshot_indices(2490, 16, seed)
    assert f"got {seed!r}" in str(err.value) and "non-negative integer" in str(err.value)


def test_numpy_integers_accepted():
    assert kshot_indices(2490, np.int64(16), np.int32(4)) == kshot_indices(2490, 16, 4)


def test_split_hash_is_sha256_of_idx_lists():
    expect = hashlib.sha256(b'{"train":[3,1],"dev":[2]}').hexdigest()
    assert split_hash([3, 1], [2]) == expect
    assert split_hash([1, 3], [2]) != expect  # order matters
    assert split_hash([3], [1, 2]) != expect  # membership matters


# --- build_task_data on real files ------------------------------------------------------------------


def read_raw(path):
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@needs_glue
def test_build_task_data_rte():
    data = build_task_data("rte", 100, 111, GLUE_DIR)
    assert isinstance(data, TaskData)
    assert (data.task, data.k, data.data_seed) == (get_task("rte"), 100, 111)
    assert data.train.num_rows == 100 and data.dev.num_rows == 1000
    train_idx, dev_idx = data.train["idx"][:], data.dev["idx"][:]
    assert not set(train_idx) & set(dev_idx)

    # Rows are the GLUE train rows at the kshot_indices positions (RTE idx == row number).
    pos_train, pos_dev = kshot_indices(2490, 100, 111)
    assert train_idx == pos_train and dev_idx == pos_dev
    raw_train = read_raw(GLUE_DIR / "rte" / "train.jsonl.gz")
    assert data.train[0] == raw_train[pos_train[0]]
    assert data.dev[999] == raw_train[pos_dev[999]]
    assert data.split_hash == split_hash(pos_train, pos_dev)

    # Test = the untouched GLUE dev file, every row, in order.
    assert list(data.test) == ["dev"]
    assert data.test["dev"].to_list() == read_raw(GLUE_DIR / "rte" / "dev.jsonl.gz")


@needs_glue
def test_build_task_data_is_deterministic_per_seed():
    a = build_task_data("stsb", 32, 1, GLUE_DIR)
    b = build_task_data("stsb", 32, 1, GLUE_DIR)
    c = build_task_data("stsb", 32, 2, GLUE_DIR)
    assert a.split_hash == b.split_hash and a.train.to_list() == b.train.to_list()
    assert a.split_hash != c.split_hash
    assert a.test["dev"].num_rows == 1500
    assert isinstance(a.train[0]["label"], float)


@needs_glue
def test_build_task_data_full_and_mrpc_gapped_idx():
    data = build_task_data("mrpc", "full", 3, GLUE_DIR)
    assert data.k == "full"
    assert (data.train.num_rows, data.dev.num_rows) == (3668 - 366, 366)
    all_idx = load_split("mrpc", "train", GLUE_DIR)["idx"][:]
    pos_train, pos_dev = kshot_indices(3668, "full", 3)
    # split_hash uses the GLUE idx values, which differ from row positions in MRPC.
    assert data.split_hash == split_hash([all_idx[p] for p in pos_train], [all_idx[p] for p in pos_dev])
    assert data.split_hash != split_hash(pos_train, pos_dev)


@needs_glue
def test_build_task_data_errors():
    with pytest.raises(DataError, match="K=5000 .* but rte has 2490; the largest K is 1490"):
        build_task_data("rte", 5000, 1, GLUE_DIR)
    with pytest.raises(MissingDataError, match=r"mnli/train\.jsonl\.gz.*nyu-mll/glue"):
        build_task_data("mnli", 100, 1, GLUE_DIR)
    with pytest.raises(DataError, match="got 0"):
        build_task_data("rte", 0, 1, GLUE_DIR)
    with pytest.raises(ValueError, match="unknown task 'rtee'"):
        build_task_data("rtee", 16, 1, GLUE_DIR)


def test_missing_test_split_is_an_error(tmp_path):
    rows = [json.dumps({"premise": "p", "hypothesis": "h", "label": i % 3, "idx": i}) for i in range(30)]
    for split in ("train", "dev_matched"):
        (tmp_path / "mnli").mkdir(exist_ok=True)
        with gzip.open(tmp_path / "mnli" / f"{split}.jsonl.gz", "wt") as fh:
            fh.write("\n".join(rows))
    with pytest.raises(MissingDataError, match=r"dev_mismatched\.jsonl\.gz"):
        build_task_data("mnli", 5, 0, tmp_path, dev_size=10)


def test_hub_route_loads_train_and_both_mnli_test_splits(monkeypatch):
    calls = []

    def fake(path, name, split):
        calls.append(split)
        n = 40 if split == "train" else 4
        return datasets.Dataset.from_dict(
            {"premise": ["p"] * n, "hypothesis": ["h"] * n, "label": [0] * n, "idx": list(range(n))}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    data = build_task_data("mnli", 8, 0, None, dev_size=20)
    assert calls == ["train", "validation_matched", "validation_mismatched"]
    assert list(data.test) == ["dev_matched", "dev_mismatched"]
    assert (data.train.num_rows, data.dev.num_rows) == (8, 20)
