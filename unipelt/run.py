"""The `unipelt` command (Hydra): config -> data -> model -> trainer -> run record.

    unipelt task=rte method=unipelt_apl data.k=100 data.seed=111
    unipelt -m task=sst2,rte method=lora,adapter,prefix,bitfit,unipelt_apl data.k=100,500,1000 data.seed=111,222,333,444,555

Reliability contract:
- every setting is validated before any work starts; a bad one is a `unipelt: error: ...` line naming the value
  and what is allowed, exit status 2, and nothing on disk changes;
- a run that fails while training (NaN/inf loss, any exception) writes a record with `status: failed` and
  exits 1; a diverged run's checkpoint is discarded, so a retry starts over;
- records and checkpoints are written atomically; a killed run leaves no record and resumes from its last
  finished epoch when the same command runs again; complete runs are skipped (when their settings match).
In a multirun, a failed job does not stop the sweep: the other jobs run, and the command exits 1 at the end.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import time
import traceback
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .confdir import CONF_DIR
from .data import build_task_data
from .io import ModuleLoadError, save_task
from .training.checkpoint import Checkpointer
from .training.record import (
    RECORD_FILE,
    base_record,
    config_diff,
    is_complete,
    now,
    peak_memory,
    read_record,
    write_record,
)

from .plan import (  # noqa: F401 - re-exported: the public names of the runner
    ConfigError,
    JobFailed,
    RunFailed,
    RunInProgress,
    RunPlan,
    plan,
    preflight,
    resolve_data_dir,
)
from .training.lock import run_lock

log = logging.getLogger("unipelt")


def execute(cfg: DictConfig) -> dict | None:
    """Run one experiment; returns its record (None when skipped because a complete record exists).

    A PEFT run trains through the grouped engine as a group of one (unipelt/grouping), so it trains exactly as it
    would inside any sweep's group; runs the engine does not cover use the per-run trainer (execute_single)."""
    from .grouping.runner import run_group, solo_reason

    p = plan(cfg)
    if solo_reason(p, cfg) is not None:
        return execute_single(cfg, p)
    if not p.force and _skip_complete(p, p.run_dir / RECORD_FILE):
        return None
    preflight(p)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    outcome = run_group([p], device, progress=bool(cfg.output.progress))[0]
    if outcome.status == "failed":
        raise RunFailed(outcome.message)
    if outcome.status == "error":
        raise outcome.error
    return outcome.record


def execute_single(cfg: DictConfig, p: RunPlan | None = None) -> dict | None:
    """Run one experiment with the per-run trainer (training/trainer.py)."""
    p = p or plan(cfg)
    record_path = p.run_dir / RECORD_FILE
    if not p.force and _skip_complete(p, record_path):
        return None
    preflight(p)
    data = build_task_data(p.spec, p.k, p.data_seed, p.data_dir, p.dev_size)
    if p.threads:
        torch.set_num_threads(p.threads)
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=p.settings.mixed_precision)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)  # the record's peak is this run's, not the process's
    model, tokenizer = build_model(p, accelerator)
    main_process = accelerator.is_main_process  # with several processes (accelerate launch) rank 0 owns the files
    with run_lock(p.run_dir) if main_process else contextlib.nullcontext():
        if not p.force and _skip_complete(p, record_path):  # finished by another process meanwhile
            return None
        if p.force and main_process:
            Checkpointer(p.run_dir / "checkpoint").clear()
        accelerator.wait_for_everyone()
        return train_and_record(cfg, p, p.settings, data, record_path, model, tokenizer, accelerator)


def _skip_complete(p: RunPlan, record_path: Path) -> bool:
    if not is_complete(record_path):
        return False
    diffs = config_diff((read_record(record_path) or {}).get("config") or {}, p.config)
    if diffs:
        raise ConfigError(
            f"a complete record for run {p.run_id} exists at {str(record_path)!r} with different settings "
            f"({'; '.join(diffs)}). Runs are identified by task, method, k, data seed, seed and model: set "
            f"output.tag=<name> to keep both, or output.force=true to replace it"
        )
    log.info("skip %s: complete record at %s (output.force=true to redo)", p.run_id, record_path)
    print(f"skip {p.run_id}: complete record exists")
    return True


def build_model(p: RunPlan, accelerator):
    from .encoders import load_encoder, load_tokenizer
    from .io import load_task
    from .model import PeltModel

    try:
        tokenizer = load_tokenizer(p.model_path)
        torch.manual_seed(p.settings.seed)
        model = PeltModel(load_encoder(p.model_path, num_layers=p.num_layers))
    except OSError as err:
        raise ConfigError(f"model {p.model_name!r}: {err}") from None
    if p.init_modules is not None:
        load_task(model, p.init_modules, name=p.spec.name)  # ModuleLoadError: missing tensors, wrong shapes, ...
    else:
        model.add_task(p.spec.name, p.pelt, p.spec.num_labels)
    model.to(accelerator.device)
    return model, tokenizer


def _hydra_overrides() -> list[str] | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ValueError, ImportError, AttributeError):
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def train_and_record(cfg: DictConfig, p: RunPlan, settings, data, record_path: Path, model=None, tokenizer=None,
                     accelerator=None) -> dict:
    from .training.batching import encode
    from .training.checkpoint import CheckpointError
    from .training.trainer import Trainer, TrainingDiverged

    if model is None:
        from accelerate import Accelerator

        accelerator = Accelerator(mixed_precision=settings.mixed_precision)
        model, tokenizer = build_model(p, accelerator)
    # Test splits are keyed by their GLUE names (e.g. "dev"), so they live apart from the k-shot train/dev.
    train_enc = encode(data.train, p.spec, tokenizer, p.max_length)
    dev_enc = encode(data.dev, p.spec, tokenizer, p.max_length)
    test_enc = {name: encode(ds, p.spec, tokenizer, p.max_length) for name, ds in data.test.items()}
    p.run_dir.mkdir(parents=True, exist_ok=True)
    record = start_record(cfg, p, data, model, model.active_task, str(accelerator.device), group_size=None)
    config = record["config"]
    trainer = Trainer(model, p.spec, train_enc, dev_enc, settings, tokenizer.pad_token_id, p.run_dir,
                      accelerator, progress=bool(cfg.output.progress), config=config, pad_to=p.max_length)
    t_start = time.perf_counter()
    try:
        fit = trainer.fit()
        eval_start = time.perf_counter()
        test_metrics, gates = {}, {}
        for i, (name, enc) in enumerate(test_enc.items()):
            metrics, split_gates = trainer.evaluate(enc, split=name, gate_stats=(i == 0))
            test_metrics.update(metrics)
            gates = gates or split_gates
        test_time = time.perf_counter() - eval_start
        n_test = sum(len(enc) for enc in test_enc.values())
        dev_eval_time = (time.perf_counter() - t_start) - fit.train_s - test_time
        if cfg.output.save_modules and accelerator.is_main_process:
            save_task(model, p.run_dir / "modules", extra={"run_id": p.run_id, "best_epoch": fit.best_epoch})
        complete_record(record, p, fit, test_metrics, gates, dev_eval_time + test_time, test_time / max(n_test, 1),
                        peak_memory(accelerator.device))
        if accelerator.is_main_process:
            write_record(record_path, record)
    except CheckpointError:
        raise  # a checkpoint that cannot be resumed: a clear error (exit 2), no record, the checkpoint kept
    except TrainingDiverged as err:
        # The weights in memory may hold NaN; every saved epoch was finite, but a retry under the same settings
        # would diverge again, so the checkpoint is discarded and a re-run starts over.
        if accelerator.is_main_process:
            trainer.checkpoints.clear()
        failure = {"error": str(err), "type": "TrainingDiverged", "step": err.step, "epoch": err.epoch}
        _write_failed(record_path, record, trainer, failure, accelerator.is_main_process)
        raise RunFailed(f"{p.run_id}: {err}; failed record written to {str(record_path)!r}") from err
    except Exception as err:
        # Anything else (out of memory, a full disk, a bug): keep the checkpoint (every saved epoch is sound)
        # so a re-run resumes, and say what happened in a failed record.
        failure = {"error": f"{type(err).__name__}: {err}", "type": type(err).__name__,
                   "step": trainer.state.get("step"), "epoch": trainer.state.get("epoch"),
                   "traceback": traceback.format_exc(limit=20)}
        written = _write_failed(record_path, record, trainer, failure, accelerator.is_main_process)
        where = (f"failed record written to {str(record_path)!r}" if written
                 else "the failed record could not be written")
        raise RunFailed(f"{p.run_id}: {type(err).__name__}: {err} (at step {failure['step']}, epoch "
                        f"{failure['epoch']}); {where}; the last checkpoint is kept, so re-running resumes") from err
    if accelerator.is_main_process:
        trainer.checkpoints.clear()
    print(done_message(p, record, fit))
    return record


def start_record(cfg, p: RunPlan, data, model, task: str, device: str, group_size: int | None) -> dict:
    """The record of a run before training: identity, config, data sizes, parameter counts, how it was trained."""
    config = p.config if p.config is not None else OmegaConf.to_container(cfg, resolve=True)
    record = base_record(p.run_id, p.spec.name, p.method, p.model_name, p.k, p.data_seed, p.settings.seed,
                         p.spec.main_metric, config, data.split_hash, device)
    record["overrides"] = p.overrides if p.overrides is not None else _hydra_overrides()
    record["group_size"] = group_size  # runs that shared the encoder's forward (1: alone); null: per-run trainer
    if p.init_modules is not None:
        record["init_modules"] = {"path": str(p.init_modules),
                                  "weights_sha256": _sha256(p.init_modules / "weights.safetensors")}
    record["params"] = dict(model.parameter_counts(task))
    record["sizes"] = {"train": len(data.train), "dev": len(data.dev), "test": {k: len(v) for k, v in data.test.items()}}
    return record


def complete_record(record: dict, p: RunPlan, fit, test_metrics: dict, gates: dict, eval_s: float,
                    inference_per_example_s: float, memory: dict) -> dict:
    record.update(
        status="complete",
        dev_score=fit.dev_metrics.get(p.spec.main_metric),
        test_score=test_metrics[p.spec.main_metric],
        metrics={"dev": fit.dev_metrics, "test": test_metrics},
        best_epoch=fit.best_epoch, epochs_run=fit.epochs_run, steps=fit.steps,
        resumed_from_epoch=fit.resumed_from_epoch,
        time={"train_s": fit.train_s, "eval_s": eval_s, "train_step_s": fit.train_step_s,
              "train_epoch_s": fit.train_epoch_s, "inference_per_example_s": inference_per_example_s},
        memory=memory,
        gates=gates,
        history=fit.history,
        finished=now(),
    )
    return record


def done_message(p: RunPlan, record: dict, fit) -> str:
    return (f"done {p.run_id}: test {p.spec.main_metric} {record['test_score']:.4f} (dev {record['dev_score']:.4f}, "
            f"best epoch {fit.best_epoch}/{fit.epochs_run})")


def _write_failed(record_path: Path, record: dict, trainer, failure: dict, main_process: bool = True) -> bool:
    state = trainer.state
    history = list(state.get("history") or [])
    record.update(status="failed", failure=failure, test_score=None, dev_score=None, metrics={},
                  epochs_run=len(history), steps=state.get("step"), history=history,
                  resumed_from_epoch=state.get("resumed_from_epoch", 0), finished=now())
    if not main_process:
        return True
    try:
        write_record(record_path, record)
        return True
    except OSError as err:
        log.error("could not write the failed record %s: %s", record_path, err)
        return False


USER_ERRORS = (ValueError, FileNotFoundError, ModuleLoadError, KeyError, OmegaConfBaseException, OSError)


def _message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def run_cli(cfg: DictConfig, multirun: bool = False):
    """Run one job with the command-line error contract. Returns the dev score (for Hydra sweepers).

    Single run: a bad setting prints `unipelt: error: ...` and exits 2; a failed run prints `unipelt: run failed:
    ...` and exits 1. Multirun: the message is printed and JobFailed raised, so Hydra runs the remaining jobs
    and exits 1 at the end.
    """
    from .training.trainer import TrainingDiverged

    try:
        record = execute(cfg)
    except RunFailed as err:
        message, code = f"unipelt: run failed: {err}", RunFailed.exit_code
        if err.__cause__ is not None and not isinstance(err.__cause__, TrainingDiverged):
            print("".join(traceback.format_exception(err.__cause__)), file=sys.stderr)
    except USER_ERRORS as err:
        message, code = f"unipelt: error: {_message(err)}", 2
    else:
        return None if record is None else record.get("dev_score")
    print(message, file=sys.stderr)
    if multirun:
        raise JobFailed(f"{message}\n(the sweep's other jobs still run; re-running the same command skips complete "
                        "runs and retries failed ones)")
    sys.exit(code)


def _is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ValueError, ImportError, AttributeError):
        return False


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    return run_cli(cfg, multirun=_is_multirun())


def main():
    """The `unipelt` command: `export-peft`/`import-peft` (unipelt/interop/cli.py), else a Hydra experiment."""
    if len(sys.argv) > 1 and sys.argv[1] in ("export-peft", "import-peft"):
        from .interop.cli import main as interop_main

        sys.exit(interop_main(sys.argv[1:]))
    return hydra_main()


if __name__ == "__main__":
    main()
