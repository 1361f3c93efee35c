"""Cluster launchers for real, on this machine: a 4-run sweep through submitit's local executor (the SLURM
launcher's code path, `hydra/launcher=slurm_local`) and through a Ray head started on 127.0.0.1
(`hydra/launcher=ray_local`) leaves one complete record per run; a re-run with a diverging run skips the
complete records, writes a failed record and exits 1 instead of hanging.

Needs the extras (`pip install -e ".[slurm,ray]"`, which `make install` does); without them these tests skip.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
TINY = ["task=rte", "data.k=16", "train.epochs=1", "train.max_steps=2", "model.num_layers=1", "data.max_length=32",
        "data.dev_size=16", "runtime.threads=1", "output.progress=false"]
SWEEP = ["method=lora,bitfit", "data.seed=111,222", *TINY]
RUN_IDS = [f"rte-{m}-k16-d{d}-s42" for m in ("lora", "bitfit") for d in (111, 222)]
# Re-run: lora/111 is complete (skipped), lora/333 diverges at its first step (fault injection, not a
# result-relevant setting, so the complete record still matches).
RERUN = ["method=lora", "data.seed=111,333", "train.inject_nan_at_step=1", *TINY]
SWEEP_TIMEOUT_S = 300  # a hung launcher fails the test instead of blocking CI


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's single-machine mode, as on macOS: its servers listen on 127.0.0.1
    # only and 127.0.0.1 stays 127.0.0.1 (otherwise Ray listens on every interface and swaps 127.0.0.1 for the
    # machine's own address).
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _unipelt() -> list[str]:
    script = Path(sys.executable).with_name("unipelt")  # the installed command, as users run it
    return [str(script)] if script.is_file() else [sys.executable, "-m", "unipelt.run"]


def sweep(launcher: str, args: list[str], runs: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [*_unipelt(), "-m", f"hydra/launcher={launcher}", *args, *extra, f"output.runs_dir={runs}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=SWEEP_TIMEOUT_S, cwd=ROOT)


def check_records(runs: Path) -> dict[str, int]:
    found = sorted(p.parent.name for p in runs.glob("*/record.json"))
    assert found == sorted(RUN_IDS)
    mtimes = {}
    for rid in RUN_IDS:
        path = runs / rid / "record.json"
        record = json.loads(path.read_text())
        _, method, _, data_seed, _ = rid.split("-")
        assert record["status"] == "complete", record.get("failure")
        assert (record["run_id"], record["task"], record["method"], record["data_seed"], record["k"]) == \
            (rid, "rte", method, int(data_seed[1:]), 16)
        assert 0 <= record["test_score"] <= 1 and record["steps"] == 1
        assert (runs / rid / "modules" / "weights.safetensors").is_file()
        mtimes[rid] = path.stat().st_mtime_ns
    return mtimes


def check_rerun(out: subprocess.CompletedProcess, runs: Path, mtimes: dict[str, int]) -> None:
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    assert {rid: (runs / rid / "record.json").stat().st_mtime_ns for rid in RUN_IDS} == mtimes, \
        "complete records must be skipped, not redone"
    failed = json.loads((runs / "rte-lora-k16-d333-s42" / "record.json").read_text())
    assert failed["status"] == "failed" and failed["failure"]["type"] == "TrainingDiverged"


@pytest.mark.parametrize("launcher,plugin,target,settings", [
    ("slurm", "hydra_submitit_launcher", "submitit_launcher.SlurmLauncher", {"gpus_per_node": 1, "timeout_min": 120}),
    ("slurm_local", "hydra_submitit_launcher", "submitit_launcher.LocalLauncher", {"gpus_per_node": 0}),
    ("ray_cluster", "hydra_ray_launcher", "ray_launcher.RayLauncher",
     {"ray": {"init": {"address": "auto", "object_store_memory": None},
              "remote": {"num_gpus": 1, "num_cpus": 8, "max_retries": 0}}}),
    ("ray_local", "hydra_ray_launcher", "ray_launcher.RayLauncher",
     {"ray": {"init": {"address": "auto", "object_store_memory": None},
              "remote": {"num_gpus": 0, "num_cpus": 1, "max_retries": 0}}}),
])
def test_launcher_configs_compose(launcher, plugin, target, settings):
    """Each launcher config resolves to its plugin's launcher (a config named like the plugin's own and extending
    it would include itself: the old `ray.yaml` did, and failed with a RecursionError)."""
    pytest.importorskip(f"hydra_plugins.{plugin}", reason=f"{plugin} is not installed: pip install -e '.[slurm,ray]'")
    from hydra import compose, initialize_config_dir

    from unipelt.confdir import CONF_DIR
    from omegaconf import OmegaConf

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    conf = OmegaConf.to_container(cfg.hydra.launcher)
    assert conf["_target_"] == f"hydra_plugins.{plugin}.{target}"
    assert {key: conf[key] for key in settings} == settings


def test_submitit_local_sweep_writes_records_and_rerun_skips_them(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is not installed: pip install -e '.[slurm]'")
    runs = tmp_path / "runs"
    out = sweep("slurm_local", SWEEP, runs)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Submitit 'local' sweep" in out.stdout + out.stderr
    mtimes = check_records(runs)
    assert len(list(runs.glob("_hydra/*/.submitit/*/*_log.out"))) == 4  # one submitit job per run
    check_rerun(sweep("slurm_local", RERUN, runs), runs, mtimes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1 (2 CPUs, no dashboard), in its own temp dir; yields its address. `ray start --block`
    runs in the foreground and shuts down the processes it started when terminated, so only this head is
    stopped (`ray stop` would stop every Ray on the machine)."""
    pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")
    pytest.importorskip("hydra_plugins.hydra_ray_launcher",
                        reason="hydra-ray-launcher is not installed: pip install -e '.[ray]'")
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.is_file():
        pytest.skip(f"the ray command is not next to {sys.executable}")
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 107 chars
    log = Path(temp_dir) / "head.log"
    cmd = [str(ray_cli), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
           "--object-store-memory=100000000", f"--temp-dir={temp_dir}"]
    with open(log, "w") as f:
        head = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start (exit {head.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of this head's session that outlived it
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_sweep_on_a_local_head_writes_records_and_rerun_skips_them(tmp_path, ray_head):
    runs = tmp_path / "runs"
    address = f"hydra.launcher.ray.init.address={ray_head}"
    out = sweep("ray_local", SWEEP, runs, address)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Ray Launcher is launching 4 jobs" in out.stdout + out.stderr
    assert f"Connecting to existing Ray cluster at address: {ray_head}" in out.stdout + out.stderr
    mtimes = check_records(runs)
    check_rerun(sweep("ray_local", RERUN, runs, address), runs, mtimes)
