"""Bad input fails clearly and loses nothing: each case names the value and what is allowed, exits non-zero,
and leaves an earlier complete record (and everything else in the runs folder) untouched."""
from __future__ import annotations

import fcntl
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from unipelt.confdir import CONF_DIR
from unipelt.run import run_cli

TINY = ["model.num_layers=1", "data.k=8", "data.dev_size=16", "data.max_length=32", "train.epochs=2",
        "output.progress=false"]
GOOD_ID = "rte-lora-k8-d111-s42"


def config(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below `root` with its bytes (a lock file's content is the last runner's pid: skipped)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A runs folder holding one complete record (a real tiny run, with saved modules)."""
    root = tmp_path_factory.mktemp("runs")
    assert run_cli(config(*TINY, f"output.runs_dir={root}")) is not None
    record = json.loads((root / GOOD_ID / "record.json").read_text())
    assert record["status"] == "complete"
    return root


@pytest.fixture
def fails(runs, capsys):
    """fails(*overrides, code=2) -> stderr: runs the CLI entry point in-process, checks the exit status and that
    nothing in the runs folder changed. The run gets its own id (output.tag=bad) unless `same_id`."""

    def check(*overrides: str, code: int = 2, runs_dir: Path = runs, same_id: bool = False) -> str:
        before = snapshot(runs)
        capsys.readouterr()
        tag = [] if same_id else ["output.tag=bad"]
        with pytest.raises(SystemExit) as exit_info:
            run_cli(config(*TINY, f"output.runs_dir={runs_dir}", *tag, *overrides))
        err = capsys.readouterr().err
        assert exit_info.value.code == code, err
        assert "unipelt: error: " in err, err
        err = err[err.index("unipelt: error: "):]  # (transformers may print a weight-loading bar first)
        assert snapshot(runs) == before, "a rejected run must not change anything in the runs folder"
        assert json.loads((runs / GOOD_ID / "record.json").read_text())["status"] == "complete"
        return err

    return check


# --- unknown names -------------------------------------------------------------------------------------------
def test_unknown_task(fails):
    err = fails("task.name=rtee")
    assert "unknown task 'rtee'; choose one of: cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb" in err


@pytest.mark.parametrize("override,message", [
    ("task=rtee", "Could not find 'task/rtee'"),
    ("method=lorax", "Could not find 'method/lorax'"),
    ("model=gpt2", "Could not find 'model/gpt2'"),
])
def test_unknown_config_group_option_lists_the_options(override, message):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        config(override)
    group = override.split("=")[0]
    assert message in str(err.value) and f"Available options in '{group}'" in str(err.value)


def test_unknown_peft_method(fails):
    err = fails("+method.pelt.methods.lorax={}")
    assert "unknown PEFT method 'lorax'; choose from: adapter, bitfit, finetune, lora, prefix" in err


def test_unknown_method_option(fails):
    assert "unknown option(s) ['rank']" in fails("+method.pelt.methods.lora.rank=4")


def test_unknown_model_path(fails, tmp_path):
    err = fails(f"model.path={tmp_path / 'no-such-model'}")
    assert f"model.path='{tmp_path / 'no-such-model'}' is not a folder; use model=minilm" in err


def test_unsupported_backbone_architecture(fails, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2}))
    err = fails(f"model.path={tmp_path}")
    assert "is a 'gpt2' encoder; supported architectures: bert, mpnet, roberta" in err


def test_num_layers_beyond_the_model(fails):
    assert "model.num_layers=99 but 'minilm' has 6 layers; allowed: 1..6 or null" in fails("model.num_layers=99")


def test_max_length_beyond_the_model(fails):
    assert "data.max_length=1000 exceeds the 512 positions of 'minilm'" in fails("data.max_length=1000")


@pytest.mark.parametrize("override,message", [
    ("+foo=1", "unknown config key(s) ['foo']"),
    ("+data.kk=5", "unknown option(s) ['data.kk']"),
    ("+train.epoch=5", "unknown train option(s) ['epoch']; allowed: epochs,"),
])
def test_unknown_config_keys(fails, override, message):
    assert message in fails(override)


# --- K, seeds, sizes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", ["0", "-3", "abc"])
def test_k_not_positive(fails, k):
    message = f"data.k: k must be a positive integer or 'full', got {k if k != 'abc' else repr(k)}"
    assert message in fails(f"data.k={k}")


def test_k_larger_than_train_minus_dev(fails):
    err = fails("data.k=2480")
    assert ("K=2480 plus a 16-example dev split needs 2496 training examples but rte has 2490; "
            "the largest K is 2474") in err


@pytest.mark.parametrize("override,message", [
    ("data.seed=-1", "data.seed: data_seed must be a non-negative integer, got -1"),
    ("train.seed=-5", "train.seed must be a non-negative integer, got -5"),
    ("train.seed=1.5", "train.seed must be a non-negative integer, got 1.5"),
])
def test_invalid_seed(fails, override, message):
    assert message in fails(override)


@pytest.mark.parametrize("override,message", [
    ("train.max_steps=0", "train.max_steps must be a positive integer or null, got 0"),
    ("data.dev_size=0", "data.dev_size must be a positive integer"),
    ("train.epochs=0", "train.epochs must be a positive integer, got 0"),
    ("train.lr=-1", "train.lr must be a positive number, got -1"),
])
def test_out_of_range_settings(fails, override, message):
    assert message in fails(override)


# --- conflicting options ----------------------------------------------------------------------------------------
def test_folded_prefix_while_training(fails):
    err = fails("method=prefix", "+method.pelt.methods.prefix.folded=true")
    assert "method.pelt.methods.prefix.folded=true conflicts with training" in err
    assert "Train with folded=false" in err and "fold_prefix()" in err


def test_fp16_on_cpu(fails):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is valid on a GPU")
    err = fails("train.mixed_precision=fp16")
    assert "train.mixed_precision=fp16 needs a CUDA GPU" in err and "use train.mixed_precision=bf16" in err


def test_same_run_id_with_other_settings_is_not_skipped_silently(fails):
    err = fails("train.epochs=3", same_id=True)  # same run id as the complete record, different schedule
    assert f"a complete record for run {GOOD_ID} exists" in err and "train.epochs: 2 -> 3" in err
    assert "output.tag=<name>" in err


def test_run_locked_by_another_process(fails, runs, tmp_path):
    other = tmp_path / "runs"
    lock_dir = other / "rte-lora-k8-d222-s42-bad"
    lock_dir.mkdir(parents=True)
    with open(lock_dir / ".lock", "w") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write("12345\n")
        handle.flush()
        err = fails("data.seed=222", runs_dir=other)
    assert "run rte-lora-k8-d222-s42-bad is already running in another process (pid 12345" in err
    assert sorted(p.name for p in lock_dir.iterdir()) == [".lock"]


# --- data files ---------------------------------------------------------------------------------------------------
def rows(n: int, start: int = 0) -> list[str]:
    return [json.dumps({"sentence1": f"premise {i}", "sentence2": f"hypothesis {i}", "label": i % 2, "idx": i})
            for i in range(start, start + n)]


def data_dir(root: Path, train: list[str], dev: list[str] | None) -> Path:
    folder = root / "glue" / "rte"
    folder.mkdir(parents=True)
    for split, lines in (("train", train), ("dev", dev)):
        if lines is not None:
            with gzip.open(folder / f"{split}.jsonl.gz", "wt") as f:
                f.write("\n".join(lines) + "\n")
    return root / "glue"


def test_missing_data_directory(fails):
    assert "data directory '/no/such/dir' does not exist" in fails("data.dir=/no/such/dir")


def test_missing_split_file(fails, tmp_path):
    root = data_dir(tmp_path, rows(40), None)
    err = fails(f"data.dir={root}")
    assert f"missing file '{root / 'rte' / 'dev.jsonl.gz'}'" in err


@pytest.mark.parametrize("line,message", [
    ('{"sentence1": "a", "sentence2": "b", "label": 0, "idx": 99', "line 3: not valid JSON"),
    ('{"sentence1": "a", "label": 0, "idx": 99}', "line 3: missing text field 'sentence2' (task rte needs"),
    ('{"sentence1": "a", "sentence2": "b", "label": 5, "idx": 99}',
     "line 3: label 5 out of range for rte; expected an integer in 0..1"),
    ('{"sentence1": "a", "sentence2": "b", "label": 1}', "line 3: missing field 'idx'"),
])
def test_bad_line_in_a_data_file_names_file_and_line(fails, tmp_path, line, message):
    train = rows(40)
    train.insert(2, line)
    root = data_dir(tmp_path, train, rows(10, start=100))
    err = fails(f"data.dir={root}")
    assert f"{(root / 'rte' / 'train.jsonl.gz').resolve()}, {message}" in err


# --- saved module folders (init.modules) --------------------------------------------------------------------------
@pytest.fixture
def modules(runs, tmp_path):
    """A copy of the complete run's saved modules (its encoder: MiniLM cut to 1 layer)."""
    folder = tmp_path / "modules"
    shutil.copytree(runs / GOOD_ID / "modules", folder)
    return folder


def test_module_folder_for_another_encoder_shape(fails, modules):
    err = fails(f"init.modules={modules}", "model.num_layers=2")
    assert f"modules in '{modules}' were trained on a different encoder (num_layers: saved 1 vs encoder 2)" in err


def test_module_folder_with_wrong_hidden_size(fails, modules):
    meta = json.loads((modules / "config.json").read_text())
    meta["encoder"]["hidden_size"] = 768
    (modules / "config.json").write_text(json.dumps(meta))
    err = fails(f"init.modules={modules}")
    assert "were trained on a different encoder (hidden_size: saved 768 vs encoder 384)" in err


def test_module_folder_with_missing_tensors(fails, modules):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(modules / "weights.safetensors"))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(modules / "weights.safetensors"))
    err = fails(f"init.modules={modules}")
    assert f"{modules / 'weights.safetensors'} does not match its config: missing tensors ['{dropped}']" in err


def test_module_folder_for_another_method(fails, modules):
    err = fails(f"init.modules={modules}", "method=bitfit")
    assert f"init.modules '{modules}' was saved with method config" in err and "method=bitfit configures" in err


def test_module_folder_with_a_pickle_is_refused_not_executed(fails, modules, tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (modules / "optimizer.data").write_bytes(pickle.dumps(Payload()))  # a pickle under a harmless-looking name
    err = fails(f"init.modules={modules}")
    assert "contains pickle file(s) ['optimizer.data']" in err and "never unpickles" in err
    assert not marker.exists()


def test_missing_module_folder(fails, tmp_path):
    assert f"module folder '{tmp_path / 'nope'}' does not exist" in fails(f"init.modules={tmp_path / 'nope'}")


def test_a_matching_module_folder_starts_training_from_its_weights(runs, modules, tmp_path):
    """The positive control for the checks above: a folder that fits is loaded, and training starts from it."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    other = tmp_path / "runs"
    rec = run_cli(config(*TINY, f"output.runs_dir={other}", f"init.modules={modules}", "train.epochs=1",
                         "train.lr=1e-12"))
    assert rec is not None
    record = json.loads((other / GOOD_ID / "record.json").read_text())
    assert record["status"] == "complete"
    weights = (modules / "weights.safetensors").read_bytes()
    assert record["init_modules"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    start = load_file(str(modules / "weights.safetensors"))
    end = load_file(str(other / GOOD_ID / "modules" / "weights.safetensors"))
    assert start.keys() == end.keys() and all(torch.allclose(start[k], end[k], atol=1e-6) for k in start)


# --- the real command line ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("args,code,message", [
    (["+foo=1"], 2, "unipelt: error: unknown config key(s) ['foo']"),
    (["trian.epochs=3"], 1, "Could not override 'trian.epochs'"),
])
def test_cli_exit_status_and_message(runs, args, code, message):
    before = snapshot(runs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "unipelt.run", *TINY, *args, f"output.runs_dir={runs}"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == code, out.stderr[-2000:]
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    after = snapshot(runs)
    assert {k: v for k, v in after.items() if not k.startswith("_hydra")} == \
        {k: v for k, v in before.items() if not k.startswith("_hydra")}


def test_known_config_keys_are_read_once_and_again_when_a_conf_file_changes(tmp_path, monkeypatch):
    import shutil

    import unipelt.plan as plan_module

    conf = tmp_path / "conf"
    shutil.copytree(plan_module.CONF_DIR, conf)
    monkeypatch.setattr(plan_module, "CONF_DIR", conf)
    first = plan_module.known_keys()
    assert plan_module.known_keys() is first  # cached: a sweep plans hundreds of runs
    assert "extra_knob" not in first["data"]
    (conf / "data" / "with_knob.yaml").write_text("dir: default\nextra_knob: 3\n")
    again = plan_module.known_keys()
    assert again is not first and "extra_knob" in again["data"]  # a new option file is seen at once
