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
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import PeltConfig
from .data import DataError, TaskSpec, build_task_data, check_data_seed, check_k, default_data_dir, get_task
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
    run_id,
    write_record,
)

log = logging.getLogger("unipelt")
CONF_DIR = Path(__file__).parent / "conf"


class ConfigError(ValueError):
    """A bad setting; the message names it and what is allowed."""


class RunInProgress(ConfigError):
    """Another process holds the run's lock."""


class RunFailed(RuntimeError):
    """A run started training and failed; its failed record has been written (exit status 1)."""

    exit_code = 1


class JobFailed(CompactHydraException):
    """Raised to Hydra for a failed job of a multirun, so the sweep goes on and exits 1 at the end (a compact
    Hydra exception: Hydra prints its message, not a traceback)."""


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
    settings: object = None  # TrainSettings
    config: dict | None = None  # the resolved config (as stored in the record)
    init_modules: Path | None = None
    threads: int | None = None


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


# --- validation ---------------------------------------------------------------------------------------------
def known_keys() -> dict[str, set[str]]:
    """Config keys the runner understands: section -> keys ("" = top level), read from the shipped conf files
    (config.yaml, every option of every config group, experiments), so new options need no change here."""
    known: dict[str, set[str]] = {"": set()}

    def add_global(data: dict) -> None:
        for key, value in data.items():
            if key in ("defaults", "hydra"):
                continue
            known[""].add(key)
            if isinstance(value, dict):
                known.setdefault(key, set()).update(value)

    add_global(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml")) or {})
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")):
        for path in group.glob("*.yaml"):
            data = OmegaConf.to_container(OmegaConf.load(path)) or {}
            if group.name == "experiment" or "@package _global_" in path.read_text().split("\n", 1)[0]:
                add_global(data)
            else:
                known[""].add(group.name)
                known.setdefault(group.name, set()).update(k for k in data if k != "defaults")
    return known


def check_keys(cfg: DictConfig) -> None:
    """Unknown keys (e.g. a misspelt `+trian.epochs=3`) are an error, not silently ignored."""
    known = known_keys()
    top = sorted(str(k) for k in cfg.keys())
    unknown = [k for k in top if k not in known[""]]
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} (a misspelt +key=value override?); the top-level "
                          f"sections are: {', '.join(sorted(known['']))}")
    for section in top:
        # train: TrainSettings names its fields; method.pelt: PeltConfig validates its content
        if section == "train" or section not in known or not OmegaConf.is_dict(cfg[section]):
            continue
        bad = sorted(str(k) for k in cfg[section].keys() if k not in known[section])
        if bad:
            raise ConfigError(f"unknown option(s) {[f'{section}.{k}' for k in bad]} (a misspelt +key=value "
                              f"override?); {section} takes: {', '.join(sorted(known[section]))}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_optional_positive(name: str, value) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer or null, got {value!r}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


NAME_RE = re.compile(r"[A-Za-z0-9_.+=-]+")


def plan(cfg: DictConfig) -> RunPlan:
    """Validate every setting (no data, model or output is touched); raises ConfigError/DataError naming it."""
    from .training.trainer import TrainSettings

    check_keys(cfg)
    spec = get_task(cfg.task.name)
    declared = {"num_labels": cfg.task.get("num_labels"), "text_fields": list(cfg.task.get("text_fields") or [])}
    if declared["num_labels"] not in (None, spec.num_labels) or declared["text_fields"] not in ([], list(spec.text_fields)):
        raise ConfigError(f"task config {spec.name!r} disagrees with the task registry: {declared}")
    method = cfg.method.name
    if not isinstance(method, str) or not NAME_RE.fullmatch(method):
        raise ConfigError(f"method.name must be a name of letters, digits and _.+=- (it is part of the run id), "
                          f"got {method!r}")
    try:
        pelt = PeltConfig.from_dict(OmegaConf.to_container(cfg.method.pelt, resolve=True))
    except (TypeError, AttributeError) as err:
        raise ConfigError(f"method.pelt: {err}") from err
    prefix = pelt.methods.get("prefix")
    if prefix is not None and getattr(prefix, "folded", False):
        raise ConfigError(
            "method.pelt.methods.prefix.folded=true conflicts with training: a folded prefix is the fixed key/value "
            "tensor for inference, without the MLP that prefix-tuning trains. Train with folded=false (the default); "
            "fold afterwards with PeltModel.fold_prefix() on the trained model"
        )
    try:
        k = check_k(cfg.data.k)
        data_seed = check_data_seed(cfg.data.seed)
    except DataError as err:
        raise DataError(f"data.{'k' if str(err).startswith('k ') else 'seed'}: {err}") from None
    try:
        settings = TrainSettings.from_dict(OmegaConf.to_container(cfg.train, resolve=True))
    except TypeError as err:
        raise ConfigError(f"train: {err}") from err
    if settings.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.mixed_precision=fp16 needs a CUDA GPU: on CPU fp16 autocast is not applied and the run would "
            "silently train in fp32 while its record says fp16; use train.mixed_precision=bf16 (CPU autocast) or no"
        )
    if settings.mixed_precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.mixed_precision=bf16 is not supported by this GPU; use fp16 or no")
    if not _is_int(cfg.data.max_length) or cfg.data.max_length < 8:
        raise ConfigError(f"data.max_length must be an integer >= 8, got {cfg.data.max_length!r}")
    if not _is_int(cfg.data.dev_size) or cfg.data.dev_size < 1:
        raise ConfigError(f"data.dev_size must be a positive integer (examples held out of GLUE train for early "
                          f"stopping), got {cfg.data.dev_size!r}")
    num_layers = _check_optional_positive("model.num_layers", cfg.model.get("num_layers"))
    threads = _check_optional_positive("runtime.threads", cfg.get("runtime", {}).get("threads"))
    for name in ("force", "save_modules", "progress"):
        _check_bool(f"output.{name}", cfg.output.get(name))
    tag = cfg.output.get("tag")
    if tag is not None and not NAME_RE.fullmatch(str(tag)):
        raise ConfigError(f"output.tag must be a name of letters, digits and _.+=- (it is part of the run id), "
                          f"got {tag!r}")
    if not isinstance(cfg.output.runs_dir, str) or not cfg.output.runs_dir:
        raise ConfigError(f"output.runs_dir must be a folder path, got {cfg.output.runs_dir!r}")
    init = (cfg.get("init") or {}).get("modules")
    data_dir = resolve_data_dir(cfg.data.dir)
    rid = run_id(spec.name, method, k, data_seed, settings.seed, cfg.model.name, tag)
    return RunPlan(spec, method, pelt, cfg.model.name, cfg.model.path, num_layers, k, data_seed, data_dir,
                   int(cfg.data.dev_size), int(cfg.data.max_length), rid, Path(cfg.output.runs_dir) / rid,
                   bool(cfg.output.force), settings=settings, config=OmegaConf.to_container(cfg, resolve=True),
                   init_modules=None if init is None else Path(str(init)).expanduser(), threads=threads)


def check_model(p: RunPlan):
    """Read the encoder's config (cheap: no weights) and check architecture, num_layers and max_length."""
    from transformers import AutoConfig

    from .backbones import BACKBONES, UnsupportedArchitecture
    from .encoders import resolve_model_path

    raw = str(p.model_path)
    looks_local = raw.startswith(("/", "./", "../", "~")) or os.sep + os.sep in raw
    if looks_local and not (Path(raw).expanduser() / "config.json").is_file():
        what = "is not a folder" if not Path(raw).expanduser().is_dir() else "has no config.json"
        raise ConfigError(f"model {p.model_name!r}: model.path={raw!r} {what}; use model=minilm (embedded), "
                          f"model.path=<folder with config.json and weights>, or a hub name such as bert-base-uncased")
    try:
        path = resolve_model_path(raw)
        model_cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, ImportError, KeyError) as err:
        first = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        offline = " (HF_HUB_OFFLINE=1: only local folders and the embedded 'minilm' work)" \
            if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ConfigError(f"model {p.model_name!r}: cannot read an encoder config at model.path={p.model_path!r}"
                          f"{offline}: {first}. Use model=minilm, model.path=<folder with config.json>, or a hub "
                          f"name with internet access") from None
    if model_cfg.model_type not in BACKBONES:
        raise UnsupportedArchitecture(
            f"model {p.model_name!r} (model.path={p.model_path!r}) is a {model_cfg.model_type!r} encoder; supported "
            f"architectures: {', '.join(sorted(BACKBONES))} (add an entry to unipelt/backbones.py to support another)"
        )
    layers = model_cfg.num_hidden_layers
    if p.num_layers is not None and p.num_layers > layers:
        raise ConfigError(f"model.num_layers={p.num_layers} but {p.model_name!r} has {layers} layers; "
                          f"allowed: 1..{layers} or null (all)")
    positions = getattr(model_cfg, "max_position_embeddings", None)
    if positions is not None:
        positions -= 2 if model_cfg.model_type == "roberta" else 0  # RoBERTa's position ids start after padding_idx
        if p.max_length > positions:
            raise ConfigError(f"data.max_length={p.max_length} exceeds the {positions} positions of {p.model_name!r}; "
                              f"allowed: 8..{positions}")
    return model_cfg


def check_init_modules(p: RunPlan, model_cfg) -> None:
    """`init.modules`: a saved module folder to start training from; must fit the encoder, method and task."""
    from .io import check_encoder_match, config_fingerprint, read_task_config

    folder = p.init_modules
    meta = read_task_config(folder)  # refuses pickle files, checks config.json
    check_encoder_match(meta, config_fingerprint(model_cfg, p.num_layers), folder)
    saved = PeltConfig.from_dict(meta["pelt"])
    prefix = saved.methods.get("prefix")
    if prefix is not None and getattr(prefix, "folded", False):
        raise ConfigError(f"init.modules {str(folder)!r} holds a folded prefix (inference only), which cannot be "
                          "trained further; start from modules saved before fold_prefix()")
    if saved.to_dict() != p.pelt.to_dict():
        raise ConfigError(f"init.modules {str(folder)!r} was saved with method config {saved.to_dict()} but "
                          f"method={p.method} configures {p.pelt.to_dict()}; choose the method the modules were "
                          f"trained with")
    if meta["num_labels"] != p.spec.num_labels:
        raise ConfigError(f"init.modules {str(folder)!r} has a head with {meta['num_labels']} output(s) but task "
                          f"{p.spec.name} needs {p.spec.num_labels}")


def check_output(p: RunPlan) -> None:
    runs = Path(p.run_dir).parent
    existing = runs
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output.runs_dir={str(runs)!r}: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output.runs_dir={str(runs)!r}: cannot write to {str(existing)!r} (permission denied)")
    if p.run_dir.exists() and not p.run_dir.is_dir():
        raise ConfigError(f"{str(p.run_dir)!r} exists and is not a folder")


def preflight(p: RunPlan):
    """Checks that read files but change nothing: the model config, init modules, output folder, checkpoint."""
    model_cfg = check_model(p)
    if p.init_modules is not None:
        check_init_modules(p, model_cfg)
    check_output(p)
    checkpoints = Checkpointer(p.run_dir / "checkpoint", p.config)
    if not p.force and checkpoints.exists():
        checkpoints.check_config()
    return model_cfg


# --- running ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def run_lock(run_dir: Path):
    """An exclusive lock on `<run_dir>/.lock` for the run's lifetime (released by the OS if the process dies), so
    two processes never train the same run into the same folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    handle = open(path, "a+")
    try:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            raise RunInProgress(
                f"run {run_dir.name} is already running in another process (pid {owner}, lock {str(path)!r}); "
                "wait for it, or if two jobs of one sweep share this run id, tell them apart with output.tag=<name>"
            ) from None
        except OSError:  # pragma: no cover - a file system without locks
            pass
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        # Temp files of atomic writes interrupted by a kill: never read, safe to drop while holding the lock.
        for folder in (run_dir, run_dir / "checkpoint", run_dir / "modules"):
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
                tmp.unlink(missing_ok=True)
        yield
    finally:
        handle.close()


def execute(cfg: DictConfig) -> dict | None:
    """Run one experiment; returns its record (None when skipped because a complete record exists)."""
    p = plan(cfg)
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
    config = p.config if p.config is not None else OmegaConf.to_container(cfg, resolve=True)
    record = base_record(p.run_id, p.spec.name, p.method, p.model_name, p.k, p.data_seed, settings.seed,
                         p.spec.main_metric, config, data.split_hash, str(accelerator.device))
    record["overrides"] = _hydra_overrides()
    if p.init_modules is not None:
        record["init_modules"] = {"path": str(p.init_modules),
                                  "weights_sha256": _sha256(p.init_modules / "weights.safetensors")}
    record["params"] = {key: value for key, value in model.parameter_counts().items()}
    record["sizes"] = {"train": len(data.train), "dev": len(data.dev), "test": {k: len(v) for k, v in data.test.items()}}
    trainer = Trainer(model, p.spec, train_enc, dev_enc, settings, tokenizer.pad_token_id, p.run_dir,
                      accelerator, progress=bool(cfg.output.progress), config=config)
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
        record.update(
            status="complete",
            dev_score=fit.dev_metrics.get(p.spec.main_metric),
            test_score=test_metrics[p.spec.main_metric],
            metrics={"dev": fit.dev_metrics, "test": test_metrics},
            best_epoch=fit.best_epoch, epochs_run=fit.epochs_run, steps=fit.steps,
            resumed_from_epoch=fit.resumed_from_epoch,
            time={"train_s": fit.train_s, "eval_s": dev_eval_time + test_time, "train_step_s": fit.train_step_s,
                  "train_epoch_s": fit.train_epoch_s, "inference_per_example_s": test_time / max(n_test, 1)},
            memory=peak_memory(accelerator.device),
            gates=gates,
            history=fit.history,
            finished=now(),
        )
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
    print(f"done {p.run_id}: test {p.spec.main_metric} {record['test_score']:.4f} (dev {record['dev_score']:.4f}, "
          f"best epoch {fit.best_epoch}/{fit.epochs_run})")
    return record


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


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_cli(cfg, multirun=_is_multirun())


if __name__ == "__main__":
    main()
