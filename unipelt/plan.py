"""A run's plan: every setting of an experiment checked before any heavy work starts.

A bad value raises ConfigError (a ValueError) whose message names the value and what is allowed; nothing on disk
changes. `plan()` validates the config, `preflight()` checks the model, module folder, output folder and any
checkpoint against it.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from .confdir import CONF_DIR
from .config import PeltConfig
from .data import DataError, TaskSpec, check_data_seed, check_k, default_data_dir, get_task
from .grouping.activations import check_activations
from .grouping.attention import check_attention_dropout
from .training.checkpoint import Checkpointer
from .training.record import (
    run_id,
)


log = logging.getLogger("unipelt")


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
    overrides: list | None = None  # the command-line overrides, when known without Hydra's global state


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
def _conf_signature() -> tuple:
    """Every conf file with its modification time: cheap to list, and it changes when a file is added or edited."""
    return tuple(sorted((str(p), p.stat().st_mtime_ns) for p in CONF_DIR.rglob("*.yaml")))


_KNOWN_KEYS: dict[tuple, dict[str, set[str]]] = {}


def known_keys() -> dict[str, set[str]]:
    """Config keys the runner understands: section -> keys ("" = top level), read from the shipped conf files
    (config.yaml, every option of every config group, experiments), so new options need no change here.
    Parsed once per state of the conf folder: a sweep plans hundreds of runs, and parsing every file for each
    took 0.3 s a run (a minute of start-up for a 200-run grid)."""
    signature = _conf_signature()
    if signature not in _KNOWN_KEYS:
        _KNOWN_KEYS.clear()
        _KNOWN_KEYS[signature] = _read_known_keys()
    return _KNOWN_KEYS[signature]


def _read_known_keys() -> dict[str, set[str]]:
    known: dict[str, set[str]] = {"": set()}

    def add_global(data: dict) -> None:
        for key, value in data.items():
            if key in ("defaults", "hydra"):
                continue
            known[""].add(key)
            if isinstance(value, dict):
                known.setdefault(key, set()).update(value)

    add_global(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml")) or {})
    # hydra/ is Hydra's own; "_"-groups (e.g. _method/, shared method settings) are parts of other configs
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")
                        and not p.name.startswith("_")):
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
    from .training.tracking import check_log_with

    check_log_with(settings.log_with)  # unknown tracker or its package missing: an error before any work
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
    group = cfg.get("group") or {}
    _check_bool("group.enabled", group.get("enabled", True))
    _check_optional_positive("group.max_runs", group.get("max_runs"))
    _check_optional_positive("group.queue", group.get("queue"))
    _check_optional_positive("group.eval_rows", group.get("eval_rows"))
    _check_bool("group.cuda_graph", group.get("cuda_graph", False))
    _check_optional_positive("group.graph_bucket", group.get("graph_bucket"))
    try:
        check_activations(group.get("activations", "fp32"), settings.mixed_precision)
        check_attention_dropout(group.get("attention_dropout", "per_run"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    tag = cfg.output.get("tag")
    if tag is not None and not NAME_RE.fullmatch(str(tag)):
        raise ConfigError(f"output.tag must be a name of letters, digits and _.+=- (it is part of the run id), "
                          f"got {tag!r}")
    if not isinstance(cfg.output.runs_dir, str) or not cfg.output.runs_dir:
        raise ConfigError(f"output.runs_dir must be a folder path, got {cfg.output.runs_dir!r}")
    init = (cfg.get("init") or {}).get("modules")
    data_dir = resolve_data_dir(cfg.data.dir)
    rid = run_id(spec.name, method, k, data_seed, settings.seed, cfg.model.name, tag)
    p = RunPlan(spec, method, pelt, cfg.model.name, cfg.model.path, num_layers, k, data_seed, data_dir,
                int(cfg.data.dev_size), int(cfg.data.max_length), rid, Path(cfg.output.runs_dir) / rid,
                bool(cfg.output.force), settings=settings, config=OmegaConf.to_container(cfg, resolve=True),
                init_modules=None if init is None else Path(str(init)).expanduser(), threads=threads)
    return resolve_auto_graphs(p, cfg)


def resolve_auto_graphs(p: RunPlan, cfg: DictConfig) -> RunPlan:
    """train.cuda_graph=auto (the default) made definite for this run: on when the per-run trainer trains it (full
    fine-tuning, group.enabled=false, ...) on one CUDA GPU, off in the grouped engine and on CPU (see
    TrainSettings.resolve_auto_graph). The plan's config, which the record stores and checkpoints and complete
    records are compared with, holds the resolved value and bucket."""
    if p.settings.cuda_graph != "auto":
        return p
    import dataclasses

    from .grouping.runner import solo_reason

    without = dataclasses.replace(p, settings=dataclasses.replace(p.settings, cuda_graph=False, graph_bucket=None))
    one_gpu = torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) == 1
    settings = p.settings.resolve_auto_graph(one_gpu and solo_reason(without, cfg) is not None)
    config = {**p.config, "train": {**p.config["train"], "cuda_graph": settings.cuda_graph,
                                    "graph_bucket": settings.graph_bucket}}
    return dataclasses.replace(p, settings=settings, config=config)


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
        if isinstance(err, ImportError):  # a packaged model (minilm, mpnet) is not installed: the message says how
            raise ConfigError(f"model {p.model_name!r}: {err}") from None
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
        # RoBERTa's and MPNet's position ids start after padding_idx (1): 514 positions hold 512 tokens
        positions -= 2 if model_cfg.model_type in ("roberta", "mpnet") else 0
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
