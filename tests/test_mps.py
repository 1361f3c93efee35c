"""The sweep's MPS daemon (unipelt/grouping/mps.py, sweep.py --mps), against a stand-in control binary that logs how
it was called: the real one needs an NVIDIA driver (it ran on the GPU, experiments/results/bench/)."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

import multiprocessing as mp
import time

from unipelt.grouping import mps
from unipelt.grouping.mps import PIPE_ENV, MPSError, mps_daemon
from unipelt.grouping.pool import physical_gpu, stop_workers

ROOT = Path(__file__).resolve().parents[1]


def fake_control(tmp_path: Path, fail: bool = False, hang_on_quit: bool = False) -> Path:
    """An executable that appends its arguments, stdin and MPS/GPU environment to calls.log."""
    log = tmp_path / "calls.log"
    script = tmp_path / "nvidia-cuda-mps-control"
    script.write_text(f"""#!/bin/sh
input=""
[ "$1" = "-d" ] || input=$(cat)
echo "args=$* stdin=$input pipe=$CUDA_MPS_PIPE_DIRECTORY gpus=$CUDA_VISIBLE_DEVICES" >> {log}
{'[ "$1" = "-d" ] || sleep 30' if hang_on_quit else ''}
{'echo "cannot start: permission denied" >&2; exit 3' if fail else 'exit 0'}
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.log").read_text().splitlines()


def test_the_daemon_runs_for_the_block_and_is_stopped_even_when_the_block_fails(tmp_path, monkeypatch):
    monkeypatch.delenv(PIPE_ENV, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    control = str(fake_control(tmp_path))
    with mps_daemon(["cuda:0", "cuda:1"], control=control) as pipe:
        assert os.environ[PIPE_ENV] == str(pipe) and pipe.is_dir()  # workers started here inherit it
        started = calls(tmp_path)
        assert started == [f"args=-d stdin= pipe={pipe} gpus=0,1"]
    assert PIPE_ENV not in os.environ and not pipe.exists()
    assert calls(tmp_path)[1] == f"args= stdin=quit pipe={pipe} gpus=0,1"  # asked to quit once the block ends
    with pytest.raises(KeyError):
        with mps_daemon(["cuda:0"], control=control) as pipe:
            raise KeyError("a worker failed")
    assert calls(tmp_path)[-1].startswith("args= stdin=quit") and PIPE_ENV not in os.environ


def test_mps_refuses_cpu_a_missing_binary_and_a_daemon_that_will_not_start(tmp_path, monkeypatch):
    monkeypatch.delenv(PIPE_ENV, raising=False)
    with pytest.raises(MPSError, match=r"\['cpu'\] are not CUDA devices"):
        with mps_daemon(["cuda:0", "cpu"], control=str(fake_control(tmp_path))):
            pass
    assert not (tmp_path / "calls.log").exists()  # nothing was started
    with pytest.raises(MPSError, match="'no-such-mps-control' is not on PATH"):
        with mps_daemon(["cuda:0"], control="no-such-mps-control"):
            pass
    with pytest.raises(MPSError, match="failed \\(3\\): cannot start: permission denied"):
        with mps_daemon(["cuda"], control=str(fake_control(tmp_path, fail=True))):
            pass
    assert PIPE_ENV not in os.environ


def test_a_daemon_named_by_the_environment_is_used_and_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv(PIPE_ENV, str(tmp_path / "theirs"))
    with mps_daemon(["cuda:0"], control=str(fake_control(tmp_path))) as pipe:
        assert pipe is None and os.environ[PIPE_ENV] == str(tmp_path / "theirs")
    assert not (tmp_path / "calls.log").exists()


def test_sweep_workers_pin_the_right_physical_gpu_and_mps_on_cpu_stops_the_sweep():
    sys.path.insert(0, str(ROOT / "experiments"))
    import sweep

    assert physical_gpu("cuda:1", None) == "1"
    assert physical_gpu("cuda:1", "2,3") == "3"  # numbered among the sweep's visible GPUs
    with pytest.raises(ValueError, match="cuda:2 is not among the 2 visible GPUs"):
        physical_gpu("cuda:2", "2,3")
    args = type("Args", (), {"mps": "on", "devices": "cpu"})()
    with pytest.raises(SystemExit, match="--mps on: MPS shares CUDA GPUs"):
        with sweep.sweep_mps(args):
            pytest.fail("the sweep must not start")


def test_a_daemon_slow_to_quit_is_left_to_finish_alone_and_does_not_hold_up_the_sweep(tmp_path, monkeypatch):
    monkeypatch.delenv(PIPE_ENV, raising=False)
    monkeypatch.setattr(mps, "QUIT_WAIT_S", 1)
    t0 = time.monotonic()
    with mps_daemon(["cuda:0"], control=str(fake_control(tmp_path, hang_on_quit=True))) as pipe:
        pass
    assert time.monotonic() - t0 < 10  # the stand-in takes 30 s to quit
    assert PIPE_ENV not in os.environ and pipe.is_dir()  # the daemon may still use its pipe: kept
    for _ in range(50):  # the quit was sent all the same
        if len(calls(tmp_path)) == 2:
            break
        time.sleep(0.1)
    assert calls(tmp_path)[1].startswith("args= stdin=quit")


def _exits() -> None:
    return None


def _hangs() -> None:
    time.sleep(600)


def test_idle_workers_that_hang_on_exit_are_stopped_after_the_grace_time(capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    import sweep

    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=_exits), ctx.Process(target=_hangs), ctx.Process(target=_hangs)]
    for w in workers:
        w.start()
    t0 = time.monotonic()
    stop_workers(workers, grace_s=1.0)
    assert time.monotonic() - t0 < 15
    assert not any(w.is_alive() for w in workers)
    assert workers[0].exitcode == 0 and workers[1].exitcode != 0
    assert "2 idle worker(s) did not exit within 1s and were stopped" in capsys.readouterr().out


def test_mps_auto_starts_the_daemon_where_it_can_and_runs_plainly_where_it_cannot(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    import sweep

    monkeypatch.delenv(PIPE_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path), prepend=os.pathsep)
    auto = type("Args", (), {"mps": "auto", "devices": "cuda:0"})()
    with sweep.sweep_mps(auto):
        assert os.environ.get(PIPE_ENV) is None  # no control binary on PATH yet: plain processes
    assert "MPS off: 'nvidia-cuda-mps-control' is not on PATH" in capsys.readouterr().out
    fake_control(tmp_path)  # now on PATH
    with sweep.sweep_mps(auto):
        assert os.environ[PIPE_ENV]
    assert "MPS daemon started" in capsys.readouterr().out and calls(tmp_path)[0].startswith("args=-d")
    for mode, devices in [("auto", "cpu"), ("off", "cuda:0")]:  # CPU: silently plain; off: nothing at all
        with sweep.sweep_mps(type("Args", (), {"mps": mode, "devices": devices})()):
            assert os.environ.get(PIPE_ENV) is None
    assert capsys.readouterr().out == "" and len(calls(tmp_path)) == 2
