"""The `grouped` Hydra launcher: collect every job of a multirun, then let unipelt's grouped runner train the
compatible ones together through one frozen encoder (unipelt/grouping/runner.py), each with its own record.

    unipelt -m task=rte,sst2 method=lora,adapter,unipelt_apl data.seed=111,222,333   # grouped (the default)
    unipelt -m hydra/launcher=basic ...                                             # one job after another
    unipelt -m ... hydra.launcher.workers_per_device=4          # 4 worker processes per GPU (every visible GPU)
    unipelt -m ... hydra.launcher.devices=[cuda:0,cuda:1]       # only these devices
    unipelt -m ... hydra.launcher.solo_workers_per_device=4     # + 4 processes per GPU for fine-tuning runs

A job whose run fails or has a bad setting does not stop the others; Hydra reports it and exits 1 at the end.
"""

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import open_dict, read_write

log = logging.getLogger(__name__)


@dataclass
class GroupedLauncherConf:
    _target_: str = "hydra_plugins.unipelt_grouped.grouped_launcher.GroupedLauncher"
    device: Optional[str] = None  # one device for everything (cuda:1, cpu); null: see devices
    devices: Any = "auto"  # auto: every visible GPU (else CPU); or a list: [cuda:0,cuda:1]
    workers_per_device: int = 1  # worker processes per device; more than one worker in all: jobs run in workers
    mps: str = "auto"  # workers on GPUs under NVIDIA MPS: auto (where available) | on | off
    solo_workers_per_device: int = 0  # more worker processes per device that take only the runs that train alone
    # (full fine-tuning), beside the groups; experiments/sweep.py uses 4 per GPU


ConfigStore.instance().store(group="hydra/launcher", name="grouped", node=GroupedLauncherConf, provider="unipelt")


class GroupedLauncher(Launcher):
    def __init__(self, device: Optional[str] = None, devices: Any = "auto", workers_per_device: int = 1,
                 mps: str = "auto", solo_workers_per_device: int = 0) -> None:
        self.device = device
        self.solo_workers_per_device = solo_workers_per_device
        self.devices = devices
        self.workers_per_device = workers_per_device
        self.mps = mps
        self.config = None
        self.hydra_context = None
        self.task_function = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.hydra_context = hydra_context
        self.task_function = task_function
        self.config = config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from unipelt.plan import JobFailed
        from unipelt.grouping.runner import execute_many

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs, grouped")
        sweep_configs, task_configs = [], []
        for idx, overrides in enumerate(job_overrides):
            log.info(f"\t#{initial_job_idx + idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = sweep_config.hydra.job.num = initial_job_idx + idx
            task_config = copy.deepcopy(sweep_config)
            with read_write(task_config), open_dict(task_config):
                del task_config["hydra"]
            sweep_configs.append(sweep_config)
            task_configs.append(task_config)
        from unipelt.grouping.pool import visible_devices

        if self.device:
            devices = [self.device]
        elif isinstance(self.devices, str):
            devices = visible_devices(self.devices)
        else:  # a list from the command line: hydra.launcher.devices=[cuda:0,cuda:1]
            devices = [str(d) for d in self.devices]
        solo = self.solo_workers_per_device
        if len(devices) * (self.workers_per_device + solo) > 1:
            log.info(f"{len(devices)} device(s) x {self.workers_per_device} worker(s): {', '.join(devices)}"
                     + (f" (+ {solo} per device for runs that train alone)" if solo else ""))
        outcomes = execute_many(task_configs, overrides=[list(o) for o in job_overrides], device=devices[0],
                                devices=devices, workers_per_device=self.workers_per_device, mps=self.mps,
                                solo_workers_per_device=solo)
        returns = []
        for overrides, sweep_config, task_config, outcome in zip(job_overrides, sweep_configs, task_configs, outcomes):
            ret = JobReturn(overrides=list(overrides), cfg=task_config, hydra_cfg=sweep_config,
                            working_dir=str(Path.cwd()), task_name=sweep_config.hydra.job.name)
            if outcome.status in ("complete", "skipped"):
                ret.status = JobStatus.COMPLETED
                ret.return_value = (outcome.record or {}).get("dev_score")
                if outcome.status == "skipped":
                    print(f"skip {outcome.run_id}: complete record exists")
            else:
                kind = "run failed" if outcome.status == "failed" else "error"
                message = f"unipelt: {kind}: {outcome.message}"
                print(message, flush=True)
                ret.status = JobStatus.FAILED
                ret.return_value = JobFailed(f"{message}\n(the sweep's other jobs still ran; re-running the same "
                                             "command skips complete runs and retries failed ones)")
            returns.append(ret)
        return returns
