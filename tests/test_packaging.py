"""The wheel ships the top-level conf/ (as unipelt/conf/): built and installed (not editable) away from the
checkout, the `unipelt` command and a Hydra compose find every config group."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _setuptools_ok() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 68


@pytest.mark.slow
def test_installed_wheel_finds_its_configs(tmp_path):
    src = tmp_path / "src"  # a clean copy: the build leaves nothing (build/, *.egg-info) in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("unipelt", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    isolation = ["--no-build-isolation"] if _setuptools_ok() else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path / "dist"),
                    str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("unipelt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for config in ("config.yaml", "method/lora.yaml", "task/rte.yaml", "experiment/demo.yaml",
                   "hydra/launcher/parallel.yaml"):
        assert f"unipelt/conf/{config}" in names, config
    assert not any(n.startswith("conf/") for n in names), "conf/ must not become a top-level package"
    assert "unipelt/interop/peft.py" in names and "unipelt/metrics/glue_metric.py" in names

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    # Only the installed copy is importable: the checkout is neither the working folder nor on PYTHONPATH
    # (the venv's own packages - torch, hydra - come from its site-packages).
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    code = (
        "import json, unipelt\n"
        "from hydra import compose, initialize_config_dir\n"
        "from unipelt.confdir import conf_dir\n"
        "with initialize_config_dir(str(conf_dir()), version_base='1.3'):\n"
        "    cfg = compose('config', overrides=['method=unipelt_apl', 'task=stsb'])\n"
        "print(json.dumps({'file': unipelt.__file__, 'conf': str(conf_dir()), 'method': cfg.method.name,\n"
        "    'lora_r': cfg.method.pelt.methods.lora.r, 'gate': cfg.method.pelt.methods.adapter.gate,\n"
        "    'pooling': cfg.method.pelt.gate_pooling, 'labels': cfg.task.num_labels, 'lr': cfg.train.lr}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(site) and Path(got["conf"]) == site / "unipelt" / "conf"
    assert (got["method"], got["lora_r"], got["gate"], got["pooling"], got["labels"], got["lr"]) == \
        ("unipelt_apl", 8, True, "masked", 1, 5e-4)
    # the installed console script (a Hydra main) composes from the shipped configs too
    cli = subprocess.run([str(site / "bin" / "unipelt"), "--cfg", "job", "method=prefix", "task=cola"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "name: prefix" in cli.stdout and "name: cola" in cli.stdout and "length: 10" in cli.stdout
