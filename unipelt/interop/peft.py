"""HF peft interop: a LoRA-only task <-> a peft LoRA folder (adapter_config.json + adapter_model.safetensors).

Export (`export_peft`, `export_peft_folder`, `unipelt export-peft`) writes what `PeftModel.from_pretrained` loads
onto the same encoder, shaped as transformers' `AutoModelForSequenceClassification` (task_type SEQ_CLS):

    base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=N)
    model = PeftModel.from_pretrained(base, EXPORT_DIR)        # same logits as the unipelt task

LoRA maps one to one: unipelt's A (r, d_in) and B (d_out, r) are peft's lora_A/lora_B weights and both scale the
update by lora_alpha / r. **The head** travels through peft's `modules_to_save`: unipelt's head (first token ->
dense -> tanh -> out) is exactly BERT's pooler + classifier and RoBERTa's classification head, so for BERT the
head's dense layer is saved as `bert.pooler.dense` and its output layer as `classifier` (modules_to_save
["classifier", "pooler"]); for RoBERTa as `classifier.dense` / `classifier.out_proj` (["classifier"]). The
number of labels is not part of a peft config: pass `num_labels` to the base model (the export's README.md and
unipelt_export.json say it). Head dropout is a training setting and is not exported.

Refused, with what would be lost: gates (peft applies a fixed scaling), adapters, prefix-tuning, BitFit, full
fine-tuning, a task with no LoRA.

Import (`import_peft`, `unipelt import-peft`) reads such a folder (written by peft or by the export) into a
PeltModel task: LoRA on whole roles (e.g. query and value of every layer) and, when saved, the head. A bare-encoder
adapter (task_type null / FEATURE_EXTRACTION) has no head: give `num_labels` and the head starts as usual. The
adapter must fit the encoder: a different base model (model type, hidden size, layers ...), per-module ranks,
DoRA, trained biases, or modules unipelt's LoRA cannot attach to are refused with the reason. Nothing is
unpickled: only safetensors weights are read.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbones import BACKBONES
from ..config import PeltConfig
from ..io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    encoder_fingerprint,
    read_task_config,
    read_weights,
)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
EXPORT_META = "unipelt_export.json"
EXPORT_FORMAT = "unipelt-peft-export"
KEY_PREFIX = "base_model.model."


class PeftInteropError(ValueError):
    """A task peft cannot hold, or a peft folder unipelt cannot hold / that does not fit the encoder."""


@dataclass(frozen=True)
class HeadLayout:
    """Where unipelt's head lives in transformers' *ForSequenceClassification model of one architecture."""

    base_prefix: str  # the encoder's attribute in the classification model ("bert", "roberta")
    dense: str  # head.dense
    out: str  # head.out
    modules_to_save: tuple


HEADS = {
    "bert": HeadLayout("bert", "bert.pooler.dense", "classifier", ("classifier", "pooler")),
    "roberta": HeadLayout("roberta", "classifier.dense", "classifier.out_proj", ("classifier",)),
}

# What a peft LoRA folder cannot hold, per unipelt method (the refusal message lists what would be lost).
LOST = {
    "adapter": "the bottleneck adapters (method 'adapter')",
    "prefix": "the prefix keys/values of prefix-tuning (method 'prefix')",
    "bitfit": "the BitFit bias deltas (method 'bitfit')",
    "finetune": "the fine-tuned encoder weights (method 'finetune'; save the whole model with transformers "
                "instead)",
}


# --------------------------------------------------------------------------------------------------- export
def _refusal(task: str, pelt: PeltConfig) -> str | None:
    """Why the task cannot be a peft LoRA (naming everything that would be lost), or None if it can."""
    lost = [LOST.get(name, f"the {name!r} modules") for name in pelt.methods if name != "lora"]
    lora = pelt.methods.get("lora")
    if lora is not None and lora.gate:
        names = ", ".join(f"lora_{role}" for role in lora.targets)
        lost.append(f"the learned per-example LoRA gates ({names}; peft scales every update by the fixed "
                    f"lora_alpha/r = {lora.scaling:g})")
    if lora is None and not lost:
        return (f"cannot export task {task!r} to peft: it has no LoRA (only its head trains), so there is nothing "
                f"for a peft LoRA adapter to hold; peft export takes a LoRA-only task (method=lora)")
    if lost:
        return (f"cannot export task {task!r} (methods: {', '.join(pelt.methods) or 'none'}) to peft: peft's LoRA "
                f"format holds plain LoRA and the head only, so the export would lose " + "; ".join(lost)
                + ". Export a LoRA-only task (method=lora) or keep unipelt's own format (save_task)")
    return None


def _target_modules(model_type: str, roles: list[str]):
    """peft target_modules for these roles: in-layer paths (peft matches them as name suffixes), or a regex when
    a path would also match another linear of the layer (e.g. 'output.dense' inside 'attention.output.dense')."""
    linears = BACKBONES[model_type].linears
    paths = [linears[r] for r in roles]
    ambiguous = any(other != p and other.endswith("." + p) for p in paths for other in linears.values())
    if not ambiguous:
        return paths
    layers = re.escape(BACKBONES[model_type].layers)
    return rf"(.*\.)?{layers}\.\d+\.({'|'.join(re.escape(p) for p in paths)})"


def build_peft_export(pelt: PeltConfig, fingerprint: dict, tensors: dict[str, torch.Tensor], num_labels: int,
                      task: str, base_model: str | None = None) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(adapter_config, peft state dict, unipelt metadata) for a task given as its saved parts; raises
    PeftInteropError for what peft cannot hold. Writes nothing."""
    reason = _refusal(task, pelt)
    if reason:
        raise PeftInteropError(reason)
    model_type = fingerprint.get("model_type")
    if model_type not in HEADS:
        raise PeftInteropError(f"cannot export task {task!r}: encoder type {model_type!r} has no peft head layout; "
                               f"supported: {', '.join(sorted(HEADS))}")
    lora = pelt.methods["lora"]
    backbone, head = BACKBONES[model_type], HEADS[model_type]
    state: dict[str, torch.Tensor] = {}
    for role in lora.targets:
        for i in range(fingerprint["num_layers"]):
            module = f"{KEY_PREFIX}{head.base_prefix}.{backbone.layers}.{i}.{backbone.linears[role]}"
            for ours, theirs in (("A", "lora_A"), ("B", "lora_B")):
                state[f"{module}.{theirs}.weight"] = tensors[f"methods.lora.updates.{role}.{i}.{ours}"]
    for ours, theirs in (("dense", head.dense), ("out", head.out)):
        for kind in ("weight", "bias"):
            state[f"{KEY_PREFIX}{theirs}.{kind}"] = tensors[f"head.{ours}.{kind}"]
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    base_model = str(base_model) if base_model else None
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": lora.r,
        "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.dropout,
        "target_modules": _target_modules(model_type, list(lora.targets)),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": list(head.modules_to_save),
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }
    meta = {"format": EXPORT_FORMAT, "task": task, "num_labels": num_labels, "encoder": fingerprint,
            "head": {"dense": head.dense, "out": head.out}, "pelt": pelt.to_dict()}
    return config, state, meta


def _readme(meta: dict, base_model: str | None) -> str:
    base = base_model or "<the base encoder's folder or hub name>"
    return (f"# unipelt task {meta['task']!r} as a peft LoRA adapter\n\n"
            f"Exported by unipelt (LoRA + the task head as `modules_to_save`). Load it onto the same encoder, "
            f"shaped for sequence classification with {meta['num_labels']} label(s):\n\n"
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForSequenceClassification\n\n"
            f"base = AutoModelForSequenceClassification.from_pretrained({base!r}, num_labels={meta['num_labels']})\n"
            "model = PeftModel.from_pretrained(base, 'THIS_FOLDER').eval()\n```\n")


def write_peft_export(out_dir: str | Path, config: dict, state: dict[str, torch.Tensor], meta: dict) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PeftInteropError(f"export folder {str(out)!r} exists and is not a folder")
    text = json.dumps(config, indent=2) + "\n"  # serialised before anything is written
    atomic_write_bytes(out / PEFT_WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_text(out / PEFT_CONFIG, text)
    atomic_write_json(out / EXPORT_META, meta)
    atomic_write_text(out / "README.md", _readme(meta, config["base_model_name_or_path"]))
    return out


def export_peft(model, out_dir: str | Path, task: str | None = None, base_model: str | None = None) -> Path:
    """Write a LoRA-only task of `model` as a peft LoRA folder (see the module docstring). `base_model` goes into
    adapter_config.json's base_model_name_or_path (default: the encoder's own name or path, if it has one)."""
    from ..io import task_state_dict

    task = task or model.active_task
    if task not in model.tasks:
        raise PeftInteropError(f"no task {task!r} to export; attached: {', '.join(model.tasks) or '(none)'}")
    modules = model.tasks[task]
    if base_model is None:
        base_model = getattr(model.encoder.config, "_name_or_path", None) or None
    reason = _refusal(task, modules.config)  # before touching tensors (a fine-tuned encoder is large)
    if reason:
        raise PeftInteropError(reason)
    parts = build_peft_export(modules.config, encoder_fingerprint(model), task_state_dict(model, task),
                              modules.head.num_labels, task, base_model)
    return write_peft_export(out_dir, *parts)


def export_peft_folder(modules_dir: str | Path, out_dir: str | Path, base_model: str | None = None) -> Path:
    """The same from a module folder written by save_task (e.g. <run_dir>/modules); no encoder is loaded."""
    meta = read_task_config(modules_dir)
    pelt = PeltConfig.from_dict(meta["pelt"])
    reason = _refusal(meta["task"], pelt)
    if reason:
        raise PeftInteropError(reason)
    parts = build_peft_export(pelt, meta["encoder"], read_weights(modules_dir), meta["num_labels"], meta["task"],
                              base_model)
    return write_peft_export(out_dir, *parts)


# --------------------------------------------------------------------------------------------------- import
@dataclass
class PeftLora:
    """A validated peft LoRA folder, ready to attach: the PeltConfig, tensors by unipelt name, and the head."""

    pelt: PeltConfig
    tensors: dict[str, torch.Tensor]  # "methods.lora.updates.<role>.<i>.A|B" and, if saved, "head.*"
    num_labels: int | None  # from the saved classifier; None for a bare-encoder adapter
    head_dense_from_pooler: bool  # classifier saved without the pooler: peft uses the base's pretrained pooler


# Options whose non-default value means the adapter holds something unipelt's LoRA cannot.
_UNSUPPORTED = {
    "use_dora": (False, "DoRA's magnitude vectors"),
    "rank_pattern": ({}, "per-module ranks (rank_pattern)"),
    "alpha_pattern": ({}, "per-module alphas (alpha_pattern)"),
    "bias": ("none", "trained biases (bias != 'none')"),
    "lora_bias": (False, "a bias on lora_B (lora_bias)"),
    "fan_in_fan_out": (False, "fan_in_fan_out (Conv1D weight layout)"),
    "layer_replication": (None, "layer replication"),
    "target_parameters": (None, "LoRA on raw parameters (target_parameters)"),
    "trainable_token_indices": (None, "trainable token embeddings"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens)"),
}
_TASK_TYPES = (None, "SEQ_CLS", "FEATURE_EXTRACTION")


def read_peft_config(peft_dir: str | Path) -> dict:
    folder = Path(peft_dir)
    if not folder.is_dir():
        raise PeftInteropError(f"peft folder {str(folder)!r} does not exist (expected {PEFT_CONFIG} and "
                               f"{PEFT_WEIGHTS}, as written by peft's save_pretrained)")
    if not (folder / PEFT_CONFIG).is_file():
        raise PeftInteropError(f"{str(folder)!r} has no {PEFT_CONFIG}: not a peft adapter folder")
    if not (folder / PEFT_WEIGHTS).is_file():
        pickled = " (it has adapter_model.bin, a pickle, which unipelt never loads: re-save it with peft's " \
                  "save_pretrained(..., safe_serialization=True))" if (folder / "adapter_model.bin").exists() else ""
        raise PeftInteropError(f"{str(folder)!r} has no {PEFT_WEIGHTS}{pickled}")
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PeftInteropError(f"{folder / PEFT_CONFIG}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise PeftInteropError(f"{folder / PEFT_CONFIG}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise PeftInteropError(f"{folder / PEFT_CONFIG}: peft_type {config.get('peft_type')!r} is not supported; "
                               f"unipelt imports LORA adapters only")
    task_type = config.get("task_type")
    if task_type not in _TASK_TYPES:
        raise PeftInteropError(f"{folder / PEFT_CONFIG}: task_type {task_type!r} is not supported; allowed: "
                               f"{', '.join(str(t) for t in _TASK_TYPES)} (an encoder with a classification head "
                               f"or a bare encoder)")
    lost = [what for key, (default, what) in _UNSUPPORTED.items()
            if config.get(key) not in (None, False, {}, [], default)]
    if lost:
        raise PeftInteropError(f"{folder / PEFT_CONFIG}: the adapter uses {', '.join(lost)}, which unipelt's LoRA "
                               f"cannot hold; only plain LoRA (one rank and alpha for all modules) is imported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise PeftInteropError(f"{folder / PEFT_CONFIG}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise PeftInteropError(f"{folder / PEFT_CONFIG}: lora_alpha must be a positive number, got {alpha!r}")
    return config


def _base_fingerprint(base: str | None) -> dict | None:
    """The fingerprint of the adapter's base model when its config can be read locally (no download)."""
    if not base:
        return None
    from transformers import AutoConfig

    from ..encoders import resolve_model_path
    from ..io import config_fingerprint

    try:
        path = resolve_model_path(base)
    except ImportError:
        return None
    try:
        return config_fingerprint(AutoConfig.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError, KeyError):
        return None


def _check_base(folder: Path, config: dict, expected: dict) -> None:
    """A peft adapter made for another base model is refused, naming each differing property."""
    claims = []
    meta_path = folder / EXPORT_META
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PeftInteropError(f"{meta_path}: not valid JSON ({err})") from None
        if isinstance(meta, dict) and isinstance(meta.get("encoder"), dict):
            claims.append((f"{meta_path.name} (written by unipelt's export)", meta["encoder"]))
    base = config.get("base_model_name_or_path")
    base_fp = _base_fingerprint(base)
    if base_fp is not None:
        claims.append((f"its base model {base!r}", base_fp))
    for source, fingerprint in claims:
        diff = {k: (v, expected.get(k)) for k, v in fingerprint.items() if k in expected and expected[k] != v}
        if diff:
            detail = ", ".join(f"{k}: adapter {a!r} vs encoder {b!r}" for k, (a, b) in diff.items())
            raise PeftInteropError(f"peft adapter {str(folder)!r} was made for another base model, per {source} "
                                   f"({detail}); load it onto that model's encoder")


def read_peft_lora(peft_dir: str | Path, fingerprint: dict, info, pretrained_pooler: bool = True) -> PeftLora:
    """Validate a peft LoRA folder against an encoder (its fingerprint and EncoderInfo) without changing anything."""
    from safetensors.torch import load_file

    folder = Path(peft_dir)
    config = read_peft_config(folder)
    model_type = fingerprint["model_type"]
    if model_type not in BACKBONES or model_type not in HEADS:
        raise PeftInteropError(f"encoder type {model_type!r} is not supported for peft import; supported: "
                               f"{', '.join(sorted(HEADS))}")
    _check_base(folder, config, fingerprint)
    try:
        raw = load_file(str(folder / PEFT_WEIGHTS))
    except Exception as err:  # safetensors raises its own error types
        raise PeftInteropError(f"{folder / PEFT_WEIGHTS}: not a readable safetensors file "
                               f"({type(err).__name__}: {err})") from None
    backbone, head = BACKBONES[model_type], HEADS[model_type]
    roles_by_path = {path: role for role, path in backbone.linears.items()}
    lora_re = re.compile(rf"(?:(?P<prefix>\w+)\.)?{re.escape(backbone.layers)}\.(?P<i>\d+)\.(?P<path>.+)"
                         rf"\.lora_(?P<ab>[AB])\.weight")
    head_keys = {f"{head.dense}.weight": "head.dense.weight", f"{head.dense}.bias": "head.dense.bias",
                 f"{head.out}.weight": "head.out.weight", f"{head.out}.bias": "head.out.bias"}
    tensors: dict[str, torch.Tensor] = {}
    layers_of: dict[str, set[int]] = {}
    unknown = []
    for key, value in raw.items():
        name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        if name in head_keys:
            tensors[head_keys[name]] = value
            continue
        m = lora_re.fullmatch(name)
        if m is None or m["path"] not in roles_by_path:
            unknown.append(key)
            continue
        if m["prefix"] not in (None, head.base_prefix):
            raise PeftInteropError(f"peft adapter {str(folder)!r} was made for another base model: its weights "
                                   f"name a {m['prefix']!r} encoder ({key}) but the encoder is a {model_type!r}")
        i, role = int(m["i"]), roles_by_path[m["path"]]
        if i >= info.num_layers:
            raise PeftInteropError(f"peft adapter {str(folder)!r} was made for another base model: it adapts "
                                   f"layer {i} ({key}) but the encoder has {info.num_layers} layers")
        tensors[f"methods.lora.updates.{role}.{i}.{m['ab']}"] = value
        layers_of.setdefault(role, set()).add(i)
    if unknown:
        raise PeftInteropError(f"peft adapter {str(folder)!r} holds weights unipelt cannot attach to a "
                               f"{model_type!r} encoder: {unknown[:5]}{' ...' if len(unknown) > 5 else ''} (LoRA is "
                               f"imported on {', '.join(backbone.linears.values())}; the head as "
                               f"{head.dense} + {head.out})")
    if not layers_of:
        raise PeftInteropError(f"peft adapter {str(folder)!r} holds no LoRA weights for a {model_type!r} encoder")
    roles = [role for role in backbone.linears if role in layers_of]
    for role in roles:
        missing = sorted(set(range(info.num_layers)) - layers_of[role])
        if missing:
            raise PeftInteropError(f"peft adapter {str(folder)!r} adapts {role} in some layers only (missing: "
                                   f"{missing}); unipelt's LoRA covers every layer of a target")
    r = config["r"]
    for role in roles:
        d_in, d_out = info.linear_shapes[role]
        for i in range(info.num_layers):
            a, b = (tensors[f"methods.lora.updates.{role}.{i}.{x}"] for x in "AB")
            if tuple(a.shape) != (r, d_in) or tuple(b.shape) != (d_out, r):
                raise PeftInteropError(
                    f"peft adapter {str(folder)!r} was made for another base model: {role} of layer {i} has "
                    f"lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, but r={r} on this encoder's "
                    f"{d_in}->{d_out} {role} needs {(r, d_in)} / {(d_out, r)}")
    num_labels, from_pooler = _head_labels(folder, tensors, head, info.hidden_size, pretrained_pooler)
    # rsLoRA scales by alpha / sqrt(r); unipelt by lora_alpha / r: the same scaling needs lora_alpha = alpha sqrt(r)
    alpha = float(config["lora_alpha"]) * (math.sqrt(r) if config.get("use_rslora") else 1.0)
    pelt = PeltConfig(methods={"lora": {"r": r, "lora_alpha": alpha, "targets": roles,
                                        "dropout": float(config.get("lora_dropout") or 0.0), "gate": False}})
    return PeftLora(pelt, tensors, num_labels, from_pooler)


def _head_labels(folder: Path, tensors: dict, head: HeadLayout, hidden: int, pretrained_pooler: bool):
    present = {k for k in tensors if k.startswith("head.")}
    if not present:
        return None, False
    if {"head.out.weight", "head.out.bias"} - present:
        raise PeftInteropError(f"peft adapter {str(folder)!r} saves part of the head ({sorted(present)}) but not "
                               f"the classifier {head.out}")
    from_pooler = not {"head.dense.weight", "head.dense.bias"} <= present
    if from_pooler and not pretrained_pooler:
        raise PeftInteropError(f"peft adapter {str(folder)!r} keeps the base model's pretrained {head.dense} "
                               f"(not saved in the adapter), but this encoder has none")
    out = tensors["head.out.weight"]
    if out.ndim != 2 or out.shape[1] != hidden:
        raise PeftInteropError(f"peft adapter {str(folder)!r}: classifier weight {tuple(out.shape)} does not fit "
                               f"hidden size {hidden}")
    if not from_pooler and tuple(tensors["head.dense.weight"].shape) != (hidden, hidden):
        raise PeftInteropError(f"peft adapter {str(folder)!r}: head dense weight "
                               f"{tuple(tensors['head.dense.weight'].shape)} does not fit hidden size {hidden}")
    return int(out.shape[0]), from_pooler


def import_peft(model, peft_dir: str | Path, task: str | None = None, num_labels: int | None = None,
                activate: bool = True) -> str:
    """Attach the peft LoRA folder `peft_dir` to `model` as task `task` (default "peft"); returns the task name.

    The head comes from the folder when peft saved it (SEQ_CLS); a bare-encoder adapter needs `num_labels` and
    gets a fresh head. Every check runs before the model changes."""
    name = task or "peft"
    if name in model.tasks:
        raise PeftInteropError(f"task {name!r} is already attached; choose another task name")
    parsed = read_peft_lora(peft_dir, encoder_fingerprint(model), model.info,
                            pretrained_pooler=getattr(model._pretrained_pooler[0], "dense", None) is not None)
    if num_labels is not None and (not isinstance(num_labels, int) or isinstance(num_labels, bool)
                                   or num_labels < 1):
        raise PeftInteropError(f"num_labels must be a positive integer, got {num_labels!r}")
    if parsed.num_labels is None and num_labels is None:
        raise PeftInteropError(f"peft adapter {str(peft_dir)!r} has no classification head (a bare-encoder "
                               f"adapter): give num_labels for the new head")
    if parsed.num_labels is not None and num_labels not in (None, parsed.num_labels):
        raise PeftInteropError(f"num_labels={num_labels} but the adapter's saved classifier has "
                               f"{parsed.num_labels} output(s)")
    model.add_task(name, parsed.pelt, parsed.num_labels or num_labels, activate=False)
    params = dict(model.tasks[name].named_parameters())
    with torch.no_grad():
        for key, value in parsed.tensors.items():
            params[key].copy_(value.to(params[key].dtype))
    if activate:
        model.set_active_task(name)
    return name
