"""The `unipelt` command (Hydra): config -> data -> model -> trainer -> run record.

    unipelt task=rte method=unipelt_apl data.k=100 data.seed=111
    unipelt -m task=sst2,rte method=lora,adapter,prefix,bitfit,unipelt_apl data.k=100,500,1000 data.seed=111,222,333,444,555
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from .config import PeltConfig
from .data import DataError, TaskSpec, build_task_data, check_data_seed, check_k, default_data_dir, get_task
from .io import ModuleLoadError, save_task
from .training.record import RECORD_FILE, base_record, is_complete, now, peak_memory, run_id, write_record

log = logging.getLogger("unipelt")


class ConfigError(ValueError):
    """A bad setting; the message names it and what is allowed."""


@dataclass
class RunPlan:
    """Everything validated before any heavy work starts."""

    spec: TaskSpec
    method: str
    pelt: PeltConfig
    model_name: str
    model_path: str
    num_layers: int | None
    k: int | str
    data_seed: int
    data_dir: Path | None
    dev_size: int
    max_length: int
    run_id: str
    run_dir: Path
    force: bool


def resolve_data_dir(value) -> Path | None:
    """`default` -> the project's data dir; null/`hub` -> the HF hub; anything else a directory that must exist."""
    if value is None or str(value).lower() in ("hub", "null", "none"):
        return None
    path = default_data_dir() if str(value) == "default" else Path(str(value)).expanduser()
    if not path.is_dir():
        raise DataError(
            f"data directory {str(path)!r} does not exist; set data.dir=<folder with <task>/<split>.jsonl.gz> "
            "or data.dir=hub to download GLUE from the Hugging Face hub"
        )
    return path


def plan(cfg: DictConfig) -> RunPlan:
    spec = get_task(cfg.task.name)
    declared = {"num_labels": cfg.task.get("num_labels"), "text_fields": list(cfg.task.get("text_fields") or [])}
    if declared["num_labels"] not in (None, spec.num_labels) or declared["text_fields"] not in ([], list(spec.text_fields)):
        raise ConfigError(f"task config {spec.name!r} disagrees with the task registry: {declared}")
    pelt = PeltConfig.from_dict(OmegaConf.to_container(cfg.method.pelt, resolve=True))
    k = check_k(cfg.data.k)
    data_seed = check_data_seed(cfg.data.seed)
    seed = cfg.train.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"train.seed must be a non-negative integer, got {seed!r}")
    if not isinstance(cfg.data.max_length, int) or cfg.data.max_length < 8:
        raise ConfigError(f"data.max_length must be an integer >= 8, got {cfg.data.max_length!r}")
    data_dir = resolve_data_dir(cfg.data.dir)
    rid = run_id(spec.name, cfg.method.name, k, data_seed, seed, cfg.model.name, cfg.output.get("tag"))
    return RunPlan(spec, cfg.method.name, pelt, cfg.model.name, cfg.model.path, cfg.model.get("num_layers"), k, data_seed,
                   data_dir, int(cfg.data.dev_size), int(cfg.data.max_length), rid, Path(cfg.output.runs_dir) / rid,
                   bool(cfg.output.force))


def execute(cfg: DictConfig) -> dict | None:
    """Run one experiment; returns its record (None when skipped because a complete record exists)."""
    from .training.trainer import TrainSettings

    p = plan(cfg)
    settings = TrainSettings(**OmegaConf.to_container(cfg.train, resolve=True))
    record_path = p.run_dir / RECORD_FILE
    if is_complete(record_path) and not p.force:
        log.info("skip %s: complete record at %s (output.force=true to redo)", p.run_id, record_path)
        print(f"skip {p.run_id}: complete record exists")
        return None
    if p.force:
        from .training.checkpoint import Checkpointer

        Checkpointer(p.run_dir / "checkpoint").clear()
    data = build_task_data(p.spec, p.k, p.data_seed, p.data_dir, p.dev_size)
    return train_and_record(cfg, p, settings, data, record_path)


def train_and_record(cfg: DictConfig, p: RunPlan, settings, data, record_path: Path) -> dict:
    from accelerate import Accelerator

    from .encoders import load_encoder, load_tokenizer
    from .model import PeltModel
    from .training.batching import encode
    from .training.trainer import Trainer, TrainingDiverged

    threads = cfg.runtime.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    accelerator = Accelerator(mixed_precision=settings.mixed_precision)
    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(p.model_path)
    model = PeltModel(load_encoder(p.model_path, num_layers=p.num_layers))
    model.add_task(p.spec.name, p.pelt, p.spec.num_labels)
    model.to(accelerator.device)
    # Test splits are keyed by their GLUE names (e.g. "dev"), so they live apart from the k-shot train/dev.
    train_enc = encode(data.train, p.spec, tokenizer, p.max_length)
    dev_enc = encode(data.dev, p.spec, tokenizer, p.max_length)
    test_enc = {name: encode(ds, p.spec, tokenizer, p.max_length) for name, ds in data.test.items()}
    p.run_dir.mkdir(parents=True, exist_ok=True)
    record = base_record(p.run_id, p.spec.name, p.method, p.model_name, p.k, p.data_seed, settings.seed,
                         p.spec.main_metric, OmegaConf.to_container(cfg, resolve=True), data.split_hash,
                         str(accelerator.device))
    record["params"] = {key: value for key, value in model.parameter_counts().items()}
    record["sizes"] = {"train": len(data.train), "dev": len(data.dev), "test": {k: len(v) for k, v in data.test.items()}}
    trainer = Trainer(model, p.spec, train_enc, dev_enc, settings, tokenizer.pad_token_id, p.run_dir,
                      accelerator, progress=bool(cfg.output.progress))
    t_start = time.perf_counter()
    try:
        fit = trainer.fit()
    except TrainingDiverged as err:
        record.update(status="failed", failure={"error": str(err), "step": err.step, "epoch": err.epoch},
                      test_score=None, dev_score=None)
        write_record(record_path, record)
        raise
    eval_start = time.perf_counter()
    test_metrics, gates = {}, {}
    for i, (name, enc) in enumerate(test_enc.items()):
        metrics, split_gates = trainer.evaluate(enc, split=name, gate_stats=(i == 0))
        test_metrics.update(metrics)
        gates = gates or split_gates
    test_time = time.perf_counter() - eval_start
    n_test = sum(len(enc) for enc in test_enc.values())
    dev_eval_time = (time.perf_counter() - t_start) - fit.train_s - test_time
    if cfg.output.save_modules:
        save_task(model, p.run_dir / "modules", extra={"run_id": p.run_id, "best_epoch": fit.best_epoch})
    record.update(
        status="complete",
        dev_score=fit.dev_metrics.get(p.spec.main_metric),
        test_score=test_metrics[p.spec.main_metric],
        metrics={"dev": fit.dev_metrics, "test": test_metrics},
        best_epoch=fit.best_epoch, epochs_run=fit.epochs_run, steps=fit.steps, resumed_from_epoch=fit.resumed_from_epoch,
        time={"train_s": fit.train_s, "eval_s": dev_eval_time + test_time, "train_step_s": fit.train_step_s,
              "train_epoch_s": fit.train_epoch_s, "inference_per_example_s": test_time / max(n_test, 1)},
        memory=peak_memory(accelerator.device),
        gates=gates,
        history=fit.history,
        finished=now(),
    )
    write_record(record_path, record)
    trainer.checkpoints.clear()
    print(f"done {p.run_id}: test {p.spec.main_metric} {record['test_score']:.4f} (dev {record['dev_score']:.4f}, "
          f"best epoch {fit.best_epoch}/{fit.epochs_run})")
    return record


USER_ERRORS = (ValueError, FileNotFoundError, ModuleLoadError, KeyError)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from .training.trainer import TrainingDiverged

    try:
        record = execute(cfg)
    except TrainingDiverged as err:
        print(f"unipelt: run failed: {err}", file=sys.stderr)
        sys.exit(1)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"unipelt: error: {message}", file=sys.stderr)
        sys.exit(2)
    return None if record is None else record.get("dev_score")


if __name__ == "__main__":
    main()
