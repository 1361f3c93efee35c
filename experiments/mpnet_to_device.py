#!/usr/bin/env python3
"""Move all-mpnet-base-v2 to the GPU machine (device tool) in pieces that fit its 64 MiB carry limit.

Here (CPU, unipelt installed with the MPNet parts):
    python experiments/mpnet_to_device.py pack
writes into the git-ignored .dev/mpnet_parts/: the weights as bf16 safetensors (about 219 MB) split into equal parts
that each fit one call beside the current working tree (--part-bytes auto, the default; or a number of bytes),
config.json + tokenizer files, and manifest.json (sha256 and size of every part, of every small file and of the
whole weights file). The tree grows with committed results: split again when it has grown, as the parts are sized
from it.

Then carry the pieces over several device calls, one part per call, naming each file (not the folder: carrying a
folder replaces it on the device, deleting the parts that arrived before):
    carry [".dev/mpnet_parts/manifest.json", ".dev/mpnet_parts/config.json", ..., ".dev/mpnet_parts/model.safetensors.part-001"]
    carry [".dev/mpnet_parts/manifest.json", ".dev/mpnet_parts/model.safetensors.part-002"]   ...
`python experiments/mpnet_to_device.py carry-plan` prints these lists.

On the GPU machine (standard library only; nothing to install):
    python3 experiments/mpnet_to_device.py assemble        # or: status (what has arrived, nothing written)
checks every part's and the whole file's sha256 against the manifest and writes .dev/mpnet/ (config.json,
tokenizer files, model.safetensors; then model.path=.dev/mpnet). Missing or corrupt pieces: exit status 2 and a
list of them, .dev/mpnet untouched. The machine keeps .dev/ between calls while it stays warm; a fresh machine
needs the parts carried again.

Any other model folder that no longer fits one call beside the working tree (MiniLM's 45 MB since the tree passed
~15 MB on disk) travels the same way, split as it is (no conversion):
    python experiments/mpnet_to_device.py split --src .dev/minilm --parts .dev/minilm_parts
    (device) python3 experiments/mpnet_to_device.py assemble --parts .dev/minilm_parts --out .dev/minilm
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FORMAT = "unipelt-split-1"
WEIGHTS = "model.safetensors"
SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
DEFAULT_PARTS = Path(".dev/mpnet_parts")
DEFAULT_OUT = Path(".dev/mpnet")
CARRY_LIMIT = 64 * 2**20  # what one device call carries: the working tree and the carried paths together
CALL_RESERVE = 5_000_000  # room beside a part for what travels with it: the small files, or .whl + .dev/glue (4.4 MB)
MIN_PART_BYTES = 4_000_000  # below this the tree has grown too large for parts to be worth it


class SplitError(RuntimeError):
    """Parts missing or corrupt, or a bad manifest; the message lists them."""


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _entry(path: Path) -> dict:
    return {"name": path.name, "size": path.stat().st_size, "sha256": sha256(path)}


def tree_bytes(root: Path = Path(".")) -> int:
    """Bytes of what every device call carries anyway: the files git tracks plus the untracked ones it does not
    ignore (the device tool's working tree)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    return sum((Path(root) / name).stat().st_size for name in out.decode().split("\0")
               if name and (Path(root) / name).is_file())


def part_bytes_for(size: int, tree: int, reserve: int = CALL_RESERVE, limit: int = CARRY_LIMIT) -> int:
    """The part size that splits `size` bytes into as few equal parts as fit one call each beside a working tree of
    `tree` bytes and `reserve` bytes of other carried files. The tree grows with committed results, so the parts
    are sized from it each time rather than fixed."""
    room = limit - tree - reserve
    if room < MIN_PART_BYTES:
        raise SplitError(f"the working tree ({tree / 1e6:.1f} MB) leaves {max(room, 0) / 1e6:.1f} MB of the "
                         f"{limit / 2**20:.0f} MiB a call carries (after {reserve / 1e6:.1f} MB for the files that "
                         f"travel with a part); at least {MIN_PART_BYTES / 1e6:.0f} MB is needed")
    count = -(-size // room)
    return -(-size // count)


def split_file(src: Path, out_dir: Path, part_bytes: int, extra_files=()) -> dict:
    """Split `src` into `out_dir/<name>.part-NNN` (each <= part_bytes), copy `extra_files` next to them, and write
    `out_dir/manifest.json`. Returns the manifest."""
    src, out_dir = Path(src), Path(out_dir)
    if part_bytes < 1:
        raise ValueError(f"part size must be positive, got {part_bytes}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{src.name}.part-*"):  # a previous split with another part size
        old.unlink()
    parts = []
    with open(src, "rb") as f:
        index = 1
        while block := f.read(part_bytes):
            part = out_dir / f"{src.name}.part-{index:03d}"
            part.write_bytes(block)
            parts.append(_entry(part))
            index += 1
    extra = []
    for path in map(Path, extra_files):
        if path.resolve() != (out_dir / path.name).resolve():
            shutil.copyfile(path, out_dir / path.name)
        extra.append(_entry(out_dir / path.name))
    manifest = {"format": FORMAT, "file": {"name": src.name, "size": src.stat().st_size, "sha256": sha256(src)},
                "parts": parts, "extra": extra}
    tmp = out_dir / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / "manifest.json")
    return manifest


def read_manifest(parts_dir: Path) -> dict:
    path = Path(parts_dir) / "manifest.json"
    if not path.is_file():
        raise SplitError(f"no manifest at {path}: carry .dev/mpnet_parts/manifest.json (written by `pack`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SplitError(f"{path} is not valid JSON ({err}); carry it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SplitError(f"{path} is not a {FORMAT} manifest")
    return manifest


def check_parts(parts_dir: Path, manifest: dict) -> tuple[list[str], list[str]]:
    """(missing, corrupt): names of the parts and small files that have not arrived, or differ from the manifest."""
    missing, corrupt = [], []
    for entry in manifest["parts"] + manifest["extra"]:
        path = Path(parts_dir) / entry["name"]
        if not path.is_file():
            missing.append(entry["name"])
        elif path.stat().st_size != entry["size"]:
            corrupt.append(f"{entry['name']} (size {path.stat().st_size}, expected {entry['size']})")
        elif sha256(path) != entry["sha256"]:
            corrupt.append(f"{entry['name']} (sha256 mismatch)")
    return missing, corrupt


def assemble(parts_dir: Path, out_dir: Path) -> Path:
    """Verify everything against the manifest, then write `out_dir` atomically (temp folder + rename)."""
    parts_dir, out_dir = Path(parts_dir), Path(out_dir)
    manifest = read_manifest(parts_dir)
    missing, corrupt = check_parts(parts_dir, manifest)
    if missing or corrupt:
        lines = [f"{len(missing)} missing, {len(corrupt)} corrupt of {len(manifest['parts']) + len(manifest['extra'])} "
                 f"pieces in {parts_dir}:"]
        lines += [f"  missing: {name}" for name in missing] + [f"  corrupt: {what}" for what in corrupt]
        lines.append("carry the missing/corrupt files again (e.g. carry [\"" + str(parts_dir / "manifest.json")
                     + "\", \"" + str(parts_dir / (missing + corrupt)[0].split(" ")[0]) + "\"]), then re-run assemble")
        raise SplitError("\n".join(lines))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        target = tmp / manifest["file"]["name"]
        h = hashlib.sha256()
        with open(target, "wb") as out:
            for entry in manifest["parts"]:
                data = (parts_dir / entry["name"]).read_bytes()
                h.update(data)
                out.write(data)
        if h.hexdigest() != manifest["file"]["sha256"] or target.stat().st_size != manifest["file"]["size"]:
            raise SplitError(f"the joined {manifest['file']['name']} does not match the manifest's sha256/size although "
                             "every part does: the manifest is inconsistent; run `pack` again and carry everything")
        for entry in manifest["extra"]:
            shutil.copyfile(parts_dir / entry["name"], tmp / entry["name"])
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def pack(parts_dir: Path, part_bytes) -> dict:
    """CPU side: all-mpnet-base-v2 -> bf16 safetensors -> parts + manifest (needs unipelt, torch, safetensors).
    `part_bytes(size)` gives the part size for the weights' size."""
    import torch
    from safetensors.torch import load_file, save_file

    from unipelt.encoders import resolve_model_path

    src = Path(resolve_model_path("mpnet"))
    state = load_file(str(src / WEIGHTS))
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / WEIGHTS
        save_file(state, str(weights), metadata={"format": "pt"})
        extra = [src / name for name in SMALL_FILES if (src / name).is_file()]
        return split_file(weights, parts_dir, part_bytes(weights.stat().st_size), extra)


def carry_plan(parts_dir: Path) -> list[list[str]]:
    """One carry list per device call: the manifest and small files with part 1, then one part per call."""
    manifest = read_manifest(parts_dir)
    head = [str(parts_dir / "manifest.json")] + [str(parts_dir / e["name"]) for e in manifest["extra"]]
    calls = [[str(parts_dir / "manifest.json"), str(parts_dir / e["name"])] for e in manifest["parts"]]
    calls[0] = head + calls[0][1:]
    return calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["pack", "split", "carry-plan", "status", "assemble"])
    parser.add_argument("--src", type=Path, default=None,
                        help="split: a model folder already as it should arrive (e.g. .dev/minilm), split as it is")
    parser.add_argument("--parts", type=Path, default=DEFAULT_PARTS, help="folder of the parts (%(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="assembled model folder (%(default)s)")
    parser.add_argument("--part-bytes", default="auto",
                        help="bytes per part, or auto (default): as few equal parts as each fit one call beside the "
                             "current working tree (git's files) and 5 MB of other carried files")
    args = parser.parse_args(argv)
    try:
        if args.part_bytes != "auto" and not args.part_bytes.isdigit():
            raise SplitError(f"--part-bytes takes a number of bytes or auto, got {args.part_bytes!r}")

        def part_bytes(size: int) -> int:
            return int(args.part_bytes) if args.part_bytes != "auto" else part_bytes_for(size, tree_bytes())

        if args.command == "pack":
            manifest = pack(args.parts, part_bytes)
            print(f"{manifest['file']['name']}: {manifest['file']['size'] / 1e6:.1f} MB in {len(manifest['parts'])} "
                  f"parts + {len(manifest['extra'])} small files under {args.parts}")
            for i, files in enumerate(carry_plan(args.parts), 1):
                print(f"call {i}: carry {json.dumps(files)}")
        elif args.command == "split":
            if args.src is None or not (args.src / WEIGHTS).is_file():
                raise SplitError(f"split needs --src, a folder with {WEIGHTS} (got {args.src})")
            extra = [args.src / name for name in SMALL_FILES if (args.src / name).is_file()]
            manifest = split_file(args.src / WEIGHTS, args.parts, part_bytes((args.src / WEIGHTS).stat().st_size),
                                  extra)
            print(f"{args.src / WEIGHTS}: {manifest['file']['size'] / 1e6:.1f} MB in {len(manifest['parts'])} parts "
                  f"+ {len(extra)} small files under {args.parts}")
            for i, files in enumerate(carry_plan(args.parts), 1):
                print(f"call {i}: carry {json.dumps(files)}")
        elif args.command == "carry-plan":
            tree = tree_bytes()
            for i, files in enumerate(carry_plan(args.parts), 1):
                print(json.dumps(files))
                total = tree + CALL_RESERVE + sum(Path(f).stat().st_size for f in files)
                if total > CARRY_LIMIT:
                    print(f"warning: call {i} would carry {total / 1e6:.1f} MB with the working tree "
                          f"({tree / 1e6:.1f} MB) and {CALL_RESERVE / 1e6:.0f} MB of other files, over the "
                          f"{CARRY_LIMIT / 2**20:.0f} MiB limit: split again (--part-bytes auto)", file=sys.stderr)
        elif args.command == "status":
            manifest = read_manifest(args.parts)
            missing, corrupt = check_parts(args.parts, manifest)
            total = len(manifest["parts"]) + len(manifest["extra"])
            print(f"{total - len(missing) - len(corrupt)}/{total} pieces present and verified"
                  + "".join(f"\n  missing: {m}" for m in missing) + "".join(f"\n  corrupt: {c}" for c in corrupt))
            return 0 if not (missing or corrupt) else 2
        else:
            out = assemble(args.parts, args.out)
            print(f"assembled {out} ({', '.join(sorted(p.name for p in out.iterdir()))}); use model.path={out}")
    except SplitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
