"""`unipelt export-peft` / `unipelt import-peft`: subcommands of the `unipelt` command, handled before Hydra.

    unipelt export-peft runs/<run_id>/modules exported/ [--base-model NAME_OR_PATH]
    unipelt import-peft peft_adapter/ modules/ [--model minilm] [--task NAME] [--num-labels N]

Bad input prints `unipelt <subcommand>: error: ...` and exits 2 without writing anything.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

SUBCOMMANDS = ("export-peft", "import-peft")


def _base_from_record(modules_dir: Path) -> str | None:
    """The model path of the run that saved `modules_dir` (<run_dir>/modules next to <run_dir>/record.json)."""
    record = modules_dir.parent / "record.json"
    try:
        config = json.loads(record.read_text()).get("config") or {}
        path = (config.get("model") or {}).get("path")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(path, str) or not path:
        return None
    from ..encoders import resolve_model_path

    try:
        return resolve_model_path(path)
    except ImportError:
        return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unipelt", description="unipelt <-> HF peft LoRA conversion (see "
                                "unipelt/interop/peft.py); any other arguments run an experiment (Hydra)")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export-peft", help="a LoRA-only module folder -> a peft LoRA folder")
    e.add_argument("modules_dir", type=Path, help="module folder written by save_task (e.g. runs/<run_id>/modules)")
    e.add_argument("out_dir", type=Path, help="folder for adapter_config.json + adapter_model.safetensors")
    e.add_argument("--base-model", default=None,
                   help="base_model_name_or_path to record (default: the run's model from ../record.json)")
    i = sub.add_parser("import-peft", help="a peft LoRA folder -> a unipelt module folder")
    i.add_argument("peft_dir", type=Path, help="peft adapter folder (adapter_config.json + adapter_model.safetensors)")
    i.add_argument("out_dir", type=Path, help="module folder to write (config.json + weights.safetensors)")
    i.add_argument("--model", default=None,
                   help="encoder: minilm, a folder or a hub name (default: the adapter's base_model_name_or_path)")
    i.add_argument("--task", default="peft", help="task name stored in the module folder (default: %(default)s)")
    i.add_argument("--num-labels", type=int, default=None,
                   help="outputs of the new head, for an adapter saved without a classifier")
    return p


def _export(args) -> str:
    from .peft import export_peft_folder

    base = args.base_model or _base_from_record(args.modules_dir)
    out = export_peft_folder(args.modules_dir, args.out_dir, base_model=base)
    return f"wrote a peft LoRA adapter to {out} (base model: {base or 'unset'})"


def _import(args) -> str:
    from ..encoders import load_encoder
    from ..io import save_task
    from ..model import PeltModel
    from .peft import PeftInteropError, import_peft, read_peft_config

    model_name = args.model or read_peft_config(args.peft_dir).get("base_model_name_or_path")
    if not model_name:
        raise PeftInteropError(f"{args.peft_dir}: the adapter names no base model; give --model (minilm, a folder "
                               f"or a hub name)")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise PeftInteropError(f"output {str(args.out_dir)!r} exists and is not a folder")
    model = PeltModel(load_encoder(model_name))
    task = import_peft(model, args.peft_dir, task=args.task, num_labels=args.num_labels)
    save_task(model, args.out_dir, task, extra={"imported_from_peft": str(args.peft_dir)})
    return f"wrote unipelt modules (task {task!r}, LoRA from {args.peft_dir}) to {args.out_dir}"


def main(argv: Sequence[str] | None = None) -> int:
    from ..io import ModuleLoadError
    from .peft import PeftInteropError

    args = _parser().parse_args(argv)
    try:
        print(_export(args) if args.command == "export-peft" else _import(args))
    except (PeftInteropError, ModuleLoadError, OSError, ValueError) as err:
        print(f"unipelt {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
