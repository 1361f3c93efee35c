"""Where things live inside each supported encoder architecture.

Methods never name a module path themselves: they ask the backbone map for "the query projection of layer i"
or "the point after the feed-forward block", so the same method code serves BERT, RoBERTa, MPNet and any architecture
added here with one entry.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .mpnet import MPNetPrefixAttentionSite


@dataclass(frozen=True)
class BackboneMap:
    """Dotted paths relative to the encoder (layers) and to one layer (everything else)."""

    layers: str
    self_attention: str
    linears: dict  # role -> path inside a layer: query, key, value, attn_output, intermediate, output
    attn_output_site: str  # adapter point after the attention output projection (+dropout), before add & norm
    ffn_output_site: str  # adapter point after the feed-forward block (+dropout), before add & norm
    layer_norms: tuple  # paths of the LayerNorms inside a layer (for BitFit's optional LayerNorm terms)
    # Grouped training (unipelt/grouping) replaces every dropout of the encoder by per-run keyed dropout: the two
    # sites above are the layer's hidden dropouts, this one the embeddings' (relative to the encoder root).
    embedding_dropout: str = "embeddings.dropout"
    attention_site: type | None = None  # PrefixAttentionSite subclass for this architecture (None: the default)


_BERT_LIKE = BackboneMap(
    layers="encoder.layer",
    self_attention="attention.self",
    linears={
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attn_output": "attention.output.dense",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
    },
    attn_output_site="attention.output.dropout",
    ffn_output_site="output.dropout",
    layer_norms=("attention.output.LayerNorm", "output.LayerNorm"),
)

# MPNet: q/k/v *and* the output projection o live in the self-attention module; the attention's dropout and
# LayerNorm sit one level up. Its relative position bias is handled by MPNetPrefixAttentionSite (see mpnet.py).
_MPNET = BackboneMap(
    layers="encoder.layer",
    self_attention="attention.attn",
    linears={
        "query": "attention.attn.q",
        "key": "attention.attn.k",
        "value": "attention.attn.v",
        "attn_output": "attention.attn.o",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
    },
    attn_output_site="attention.dropout",
    ffn_output_site="output.dropout",
    layer_norms=("attention.LayerNorm", "output.LayerNorm"),
    attention_site=MPNetPrefixAttentionSite,
)

BACKBONES: dict[str, BackboneMap] = {"bert": _BERT_LIKE, "roberta": _BERT_LIKE, "mpnet": _MPNET}


class UnsupportedArchitecture(ValueError):
    pass


def backbone_for(encoder: nn.Module) -> BackboneMap:
    """The map for an encoder, or a clear error naming the supported architectures."""
    model_type = getattr(getattr(encoder, "config", None), "model_type", None)
    if model_type not in BACKBONES:
        raise UnsupportedArchitecture(
            f"unsupported encoder architecture {model_type!r}; supported: {', '.join(sorted(BACKBONES))} "
            "(add an entry to unipelt/backbones.py to support another)"
        )
    return BACKBONES[model_type]
