"""The Hydra runner: config groups agree with the code, bad settings fail clearly, real CLI runs write records."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from unipelt.config import PeltConfig, preset
from unipelt.confdir import CONF_DIR
from unipelt.data import TASKS
from unipelt.run import execute, plan

CONF = Path(__file__).parents[1] / "conf"
TINY = ["model.num_layers=1", "data.k=8", "data.dev_size=16", "data.max_length=32", "train.epochs=2",
        "output.progress=false"]


def config(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_every_method_config_equals_its_preset():
    names = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
    assert {"finetune", "headonly", "bitfit", "adapter", "houlsby", "prefix", "lora", "unipelt_ap", "unipelt_apl",
            "unipelt_aplb", "unipelt_ap_nogate", "unipelt_apl_nogate", "unipelt_aplb_nogate"} <= set(names)
    for name in names:
        cfg = config(f"method={name}")
        from_yaml = PeltConfig.from_dict(OmegaConf.to_container(cfg.method.pelt, resolve=True))
        assert from_yaml.to_dict() == preset(name).to_dict(), name
        assert cfg.train.lr == cfg.method.lr


def test_shared_method_settings_are_written_once():
    def settings(path):  # the file without its comments
        return "\n".join(line.split("#")[0] for line in path.read_text().splitlines())

    texts = {p.name: settings(p) for p in (CONF / "method").glob("*.yaml")}
    parts = [settings(p) for p in (CONF / "_method").glob("*.yaml")]
    for key in ("gate_pooling", "head_dropout", "reduction_factor", "mlp_hidden", "lora_alpha", "include_layernorm"):
        assert not [name for name, text in texts.items() if key in text], f"{key} repeated in a method file"
        assert sum(key in text for text in parts) == 1, key
    assert all("/_method@_here_: base" in text for text in texts.values())
    cfg = config("method=unipelt_apl", "method.pelt.head_dropout=0.3", "method.pelt.methods.lora.r=4")
    pelt = cfg.method.pelt
    assert (pelt.head_dropout, pelt.gate_pooling, pelt.methods.lora.r, pelt.methods.adapter.gate) == (0.3, "masked", 4, True)
    assert config("method=houlsby").method.pelt.methods.adapter.placement == "houlsby"
    assert "_method" not in plan(config()).config  # a helper group, not a config section


def test_method_learning_rates_follow_the_paper():
    expected = {"finetune": 2e-5, "adapter": 1e-4, "houlsby": 1e-4, "prefix": 2e-4, "lora": 5e-4, "bitfit": 1e-4,
                "unipelt_apl": 5e-4, "unipelt_ap": 5e-4, "unipelt_aplb": 5e-4}
    for name, lr in expected.items():
        assert config(f"method={name}").train.lr == pytest.approx(lr), name


def test_task_configs_match_the_task_registry():
    for name, spec in TASKS.items():
        cfg = config(f"task={name}")
        assert list(cfg.task.text_fields) == list(spec.text_fields)
        assert cfg.task.num_labels == spec.num_labels
        assert cfg.task.metric == spec.main_metric


def test_defaults_are_the_papers():
    cfg = config()
    assert (cfg.data.max_length, cfg.train.batch_size, cfg.train.epochs, cfg.train.patience, cfg.train.seed) == (128, 16, 50, 10, 42)
    assert (cfg.model.name, cfg.data.k, cfg.data.dev_size) == ("minilm", 100, 1000)
    assert config("data=full").data.k == "full"


@pytest.mark.parametrize("override,message", [
    ("data.k=0", "k must be a positive integer or 'full', got 0"),
    ("data.k=-3", "got -3"),
    ("data.seed=-1", "data_seed must be a non-negative integer, got -1"),
    ("train.seed=-5", "train.seed must be a non-negative integer, got -5"),
    ("data.dir=/no/such/dir", "data directory '/no/such/dir' does not exist"),
    ("task.name=rtee", "unknown task 'rtee'; choose one of: cola, mnli"),
    ("data.k=5000", "the largest K is 1490"),
    ("method.pelt.methods.lora.r=0", "LoRA rank r must be >= 1, got 0"),
    ("+method.pelt.methods.lora.rank=4", "unknown option(s) ['rank']"),
])
def test_bad_settings_name_the_value(override, message, tmp_path):
    cfg = config(override, f"output.runs_dir={tmp_path}")
    with pytest.raises(ValueError) as err:
        execute(cfg)
    assert message in str(err.value)
    assert not any(tmp_path.iterdir()), "a rejected run must not leave files behind"


def test_missing_split_names_the_file_and_the_hub():
    with pytest.raises(FileNotFoundError) as err:
        execute(config("task=qqp"))
    assert "qqp/train.jsonl.gz" in str(err.value) and "nyu-mll/glue" in str(err.value)


def test_run_id_names_every_axis():
    p = plan(config("task=sst2", "method=unipelt_apl", "data.k=500", "data.seed=333"))
    assert p.run_id == "sst2-unipelt_apl-k500-d333-s42"
    assert plan(config("model=roberta-base")).run_id.endswith("-roberta-base")


def cli(args, runs: Path, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "unipelt.run", *args, f"output.runs_dir={runs}"],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_cli_run_writes_a_valid_record_and_rerun_skips_it(tmp_path):
    runs = tmp_path / "runs"
    first = cli(["task=rte", "method=unipelt_apl", *TINY], runs)
    assert first.returncode == 0, first.stderr[-2000:]
    path = runs / "rte-unipelt_apl-k8-d111-s42" / "record.json"
    record = json.loads(path.read_text())
    assert record["status"] == "complete"
    assert record["sizes"] == {"train": 8, "dev": 16, "test": {"dev": 277}}
    assert 0 <= record["test_score"] <= 1 and record["main_metric"] == "accuracy"
    assert record["metrics"]["test"]["accuracy"] == record["test_score"]
    assert record["config"]["method"]["name"] == "unipelt_apl" and record["config"]["data"]["k"] == 8
    assert set(record["gates"]) == {"adapter_ffn", "prefix", "lora_query", "lora_value"}
    assert all(len(v) == 1 and 0 < v[0] < 1 for v in record["gates"].values())
    assert record["params"]["trainable"] > 0 and record["time"]["train_s"] > 0 and record["memory"]["peak_bytes"] > 0
    assert (runs / "rte-unipelt_apl-k8-d111-s42" / "modules" / "weights.safetensors").is_file()
    assert not (runs / "rte-unipelt_apl-k8-d111-s42" / "checkpoint").exists()
    mtime = path.stat().st_mtime_ns
    again = cli(["task=rte", "method=unipelt_apl", *TINY], runs)
    assert again.returncode == 0 and "skip rte-unipelt_apl-k8-d111-s42" in again.stdout
    assert path.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_parallel_multirun_sweep_writes_one_record_per_run(tmp_path):
    runs = tmp_path / "runs"
    out = cli(["-m", "hydra/launcher=parallel", "runtime.threads=1", "task=stsb", "method=lora,bitfit",
               "data.seed=111,222", *TINY], runs)
    assert out.returncode == 0, out.stderr[-2000:]
    ids = sorted(p.parent.name for p in runs.glob("*/record.json"))
    assert ids == ["stsb-bitfit-k8-d111-s42", "stsb-bitfit-k8-d222-s42", "stsb-lora-k8-d111-s42", "stsb-lora-k8-d222-s42"]
    record = json.loads((runs / ids[0] / "record.json").read_text())
    assert record["main_metric"] == "spearman" and set(record["metrics"]["test"]) == {"pearson", "spearman"}


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["task=rtee"], "Could not find 'task/rtee'"),
    (["method=lorax"], "Could not find 'method/lorax'"),
    (["data.k=0"], "got 0"),
    (["data.dir=/no/such/dir"], "'/no/such/dir' does not exist"),
])
def test_cli_bad_overrides_exit_non_zero_with_message(args, message, tmp_path):
    out = cli(args, tmp_path)
    assert out.returncode != 0
    assert message in out.stderr + out.stdout
