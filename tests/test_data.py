"""Task specs and split loading: real local GLUE files, bad files, and the hub route."""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import datasets
import pytest

from unipelt.data import glue
from unipelt.data.glue import DataError, MissingDataError, default_data_dir, features_for, load_split
from unipelt.data.tasks import TASKS, get_task

GLUE_DIR = default_data_dir()
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"local GLUE data not found at {GLUE_DIR}")


def write_gz(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def rte_line(i: int, label=0, **override) -> str:
    row = {"sentence1": f"premise {i}", "sentence2": f"hypothesis {i}", "label": label, "idx": i}
    row.update(override)
    return json.dumps(row)


# --- task specs -------------------------------------------------------------------------------------


def test_task_table_matches_glue():
    assert sorted(TASKS) == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]
    expect = {
        "cola": (("mcc",), "mcc", 2),
        "sst2": (("accuracy",), "accuracy", 2),
        "mrpc": (("f1", "accuracy"), "f1", 2),
        "qqp": (("f1", "accuracy"), "f1", 2),
        "stsb": (("pearson", "spearman"), "spearman", 1),
        "mnli": (("accuracy", "accuracy_mm"), "accuracy", 3),
        "qnli": (("accuracy",), "accuracy", 2),
        "rte": (("accuracy",), "accuracy", 2),
    }
    for name, (metrics, main, num_labels) in expect.items():
        spec = TASKS[name]
        assert (spec.name, spec.metrics, spec.main_metric, spec.num_labels) == (name, metrics, main, num_labels)
        assert spec.is_regression == (name == "stsb")
    assert TASKS["mnli"].test_splits == ("dev_matched", "dev_mismatched")
    assert TASKS["mnli"].hub_splits == {
        "train": "train",
        "dev_matched": "validation_matched",
        "dev_mismatched": "validation_mismatched",
    }
    assert TASKS["rte"].test_splits == ("dev",)
    assert TASKS["rte"].hub_splits == {"train": "train", "dev": "validation"}
    assert TASKS["qqp"].text_fields == ("question1", "question2")
    assert TASKS["qnli"].text_fields == ("question", "sentence")


def test_get_task_error_names_value_and_choices():
    with pytest.raises(ValueError) as err:
        get_task("rtee")
    assert str(err.value) == "unknown task 'rtee'; choose one of: cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb"
    assert get_task("RTE") is TASKS["rte"]
    assert get_task(TASKS["cola"]) is TASKS["cola"]


def test_taskspec_is_frozen_and_hashable():
    spec = get_task("rte")
    with pytest.raises(AttributeError):
        spec.num_labels = 3  # type: ignore[misc]
    assert {spec: 1}[get_task("rte")] == 1


# --- real local files -------------------------------------------------------------------------------


@needs_glue
@pytest.mark.parametrize(
    "task,split,rows",
    [("rte", "train", 2490), ("rte", "dev", 277), ("stsb", "dev", 1500), ("mnli", "dev_matched", 9815),
     ("mrpc", "dev", 408), ("cola", "dev", 1043)],
)
def test_local_row_counts_match_readme(task, split, rows):
    ds = load_split(task, split, GLUE_DIR)
    assert ds.num_rows == rows
    spec = get_task(task)
    assert ds.column_names == [*spec.text_fields, "label", "idx"]
    assert ds.features == features_for(spec)


@needs_glue
def test_local_labels_types_and_counts():
    rte = load_split("rte", "train", GLUE_DIR)
    assert rte.features["label"] == datasets.Value("int64")
    labels = rte["label"][:]
    assert (labels.count(0), labels.count(1)) == (1249, 1241)
    assert rte["idx"][:] == list(range(2490))

    stsb = load_split("stsb", "train", GLUE_DIR)
    assert stsb.features["label"] == datasets.Value("float32")
    scores = stsb["label"][:]
    assert all(isinstance(s, float) for s in scores)
    assert min(scores) >= 0.0 and max(scores) <= 5.0
    assert sum(scores) / len(scores) == pytest.approx(2.70, abs=0.01)

    mnli = load_split("mnli", "dev_matched", GLUE_DIR)
    counts = [mnli["label"][:].count(c) for c in range(3)]
    assert counts == [3479, 3123, 3213]

    assert load_split("mrpc", "dev", GLUE_DIR)[0]["idx"] == 9  # MRPC keeps HF's gapped idx


@needs_glue
def test_sst2_train_loads_fast_and_keeps_text_bytes():
    glue.clear_cache()
    start = time.perf_counter()
    ds = load_split("sst2", "train", GLUE_DIR)
    elapsed = time.perf_counter() - start
    assert ds.num_rows == 67349
    assert elapsed < 3.0, f"SST-2 train took {elapsed:.2f}s"
    assert ds[0]["sentence"] == "hide new secretions from the parental units "  # trailing space kept


@needs_glue
def test_loaded_datasets_do_not_share_format_state():
    a = load_split("rte", "dev", GLUE_DIR)
    a.set_format("numpy")
    b = load_split("rte", "dev", GLUE_DIR)
    assert b.format["type"] is None
    assert isinstance(b[0]["label"], int)


def test_cache_sees_rewritten_file(tmp_path):
    path = write_gz(tmp_path / "rte" / "dev.jsonl.gz", [rte_line(0), rte_line(1)])
    assert load_split("rte", "dev", tmp_path).num_rows == 2
    write_gz(path, [rte_line(0), rte_line(1), rte_line(2)])
    os.utime(path, ns=(1, 10**18))  # force a different mtime even on coarse-clock filesystems
    assert load_split("rte", "dev", tmp_path).num_rows == 3


def test_blank_lines_are_skipped(tmp_path):
    write_gz(tmp_path / "rte" / "dev.jsonl.gz", [rte_line(0), "", "   ", rte_line(1)])
    assert load_split("rte", "dev", tmp_path)["idx"][:] == [0, 1]


# --- missing data -----------------------------------------------------------------------------------


@needs_glue
def test_missing_split_names_file_and_hub():
    with pytest.raises(MissingDataError) as err:
        load_split("qqp", "train", GLUE_DIR)
    msg = str(err.value)
    assert str(GLUE_DIR / "qqp" / "train.jsonl.gz") in msg
    assert "nyu-mll/glue" in msg
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)


def test_missing_data_dir_names_path_and_settings(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(MissingDataError) as err:
        load_split("rte", "train", missing)
    msg = str(err.value)
    assert str(missing) in msg and "data.dir" in msg and "data.dir=null" in msg


def test_unknown_split_lists_allowed(tmp_path):
    with pytest.raises(DataError, match=r"unknown split 'dev' for task mnli; choose one of: train, dev_matched"):
        load_split("mnli", "dev", tmp_path)
    with pytest.raises(DataError, match=r"unknown split 'test' for task rte; choose one of: train, dev"):
        load_split("rte", "test", tmp_path)


# --- malformed files --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task,bad_line,expect",
    [
        ("rte", "{not json", r"line 3: not valid JSON .*\{not json"),
        ("rte", '["a", "list"]', r"line 3: expected a JSON object"),
        ("rte", json.dumps({"sentence1": "a", "label": 0, "idx": 2}), r"line 3: missing text field 'sentence2'"),
        ("rte", json.dumps({"sentence1": "a", "sentence2": 5, "label": 0, "idx": 2}),
         r"line 3: text field 'sentence2' must be a string, got 5"),
        ("rte", json.dumps({"sentence1": "a", "sentence2": "b", "idx": 2}), r"line 3: missing field 'label'"),
        ("rte", rte_line(2, label=2), r"line 3: label 2 out of range for rte; expected an integer in 0\.\.1"),
        ("rte", rte_line(2, label=-1), r"line 3: label -1 out of range"),
        ("rte", rte_line(2, label=1.0), r"line 3: label 1\.0 out of range"),
        ("rte", rte_line(2, label=True), r"line 3: label True out of range"),
        ("rte", rte_line(2, label="1"), r"line 3: label '1' out of range"),
        ("rte", json.dumps({"sentence1": "a", "sentence2": "b", "label": 0}), r"line 3: missing field 'idx'"),
        ("rte", rte_line(0), r"line 3: duplicate idx 0 \(first seen on line 1\)"),
        ("stsb", '{"sentence1": "a", "sentence2": "b", "label": NaN, "idx": 2}',
         r"line 3: label must be a finite number for stsb, got nan"),
        ("stsb", rte_line(2, label="high"), r"line 3: label must be a finite number for stsb, got 'high'"),
    ],
)
def test_bad_line_error_names_file_line_and_value(tmp_path, task, bad_line, expect):
    path = write_gz(tmp_path / task / "train.jsonl.gz", [rte_line(0), rte_line(1), bad_line, rte_line(3)])
    with pytest.raises(DataError, match=expect) as err:
        load_split(task, "train", tmp_path)
    assert str(path) in str(err.value)


def test_stsb_accepts_integer_scores_as_float(tmp_path):
    write_gz(tmp_path / "stsb" / "dev.jsonl.gz", [rte_line(0, label=3), rte_line(1, label=4.5)])
    ds = load_split("stsb", "dev", tmp_path)
    assert ds["label"][:] == [3.0, 4.5]


def test_not_gzip_is_a_data_error(tmp_path):
    path = tmp_path / "rte" / "dev.jsonl.gz"
    path.parent.mkdir()
    path.write_text(rte_line(0))
    with pytest.raises(DataError, match="gzip") as err:
        load_split("rte", "dev", tmp_path)
    assert str(path) in str(err.value)


def test_empty_file_is_a_data_error(tmp_path):
    write_gz(tmp_path / "rte" / "dev.jsonl.gz", [""])
    with pytest.raises(DataError, match="no examples"):
        load_split("rte", "dev", tmp_path)


# --- hub route and defaults -------------------------------------------------------------------------


def test_hub_route_calls_load_dataset_with_glue_split_names(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        feats = datasets.Features(
            {
                "premise": datasets.Value("string"),
                "hypothesis": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
                "idx": datasets.Value("int32"),
                "extra": datasets.Value("string"),
            }
        )
        return datasets.Dataset.from_dict(
            {"premise": ["p"], "hypothesis": ["h"], "label": [2], "idx": [0], "extra": ["x"]}, features=feats
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_split("mnli", "dev_mismatched", None)
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched", {})]
    assert ds.features == features_for("mnli")
    assert ds[0] == {"premise": "p", "hypothesis": "h", "label": 2, "idx": 0}


def test_hub_route_train_split(monkeypatch):
    seen = []
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda path, name, split: seen.append((path, name, split))
        or datasets.Dataset.from_dict({"sentence": ["s"], "label": [1], "idx": [0]}),
    )
    assert load_split("sst2", "train", None).num_rows == 1
    assert seen == [("nyu-mll/glue", "sst2", "train")]


def test_default_data_dir_env_and_repo_default(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIPELT_GLUE_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("UNIPELT_GLUE_DIR")
    repo_root = Path(glue.__file__).resolve().parents[2]
    assert default_data_dir() == (repo_root.parent / "shared" / "data" / "glue").resolve()
