"""MPNet (e.g. sentence-transformers/all-mpnet-base-v2, transformers `MPNetModel`): what differs from BERT.

Two things: (1) the self-attention module (`attention.attn`) also holds the output projection `o`, and (2) every
layer adds a relative position bias to its attention scores. MPNetEncoder computes that bias once per forward,
(B, H, T, T), and passes it positionally to each layer, which passes it on to `attention.attn`.

Prefix-tuning recomputes the attention over [prefix; tokens] (PrefixAttentionSite). Choice: **the relative
bias applies between real tokens only; prefix key columns get no bias (0)**. The prefix has no position in the
sequence: it is a set of learned keys/values outside it, as in Li & Liang, the UniPELT code and HF peft (which
prepend past key/values that no position encoding touches). Giving the prefix a relative position (say, "left of
token 0") would make its effect depend on each token's distance to the sequence start, which nothing in the
method asks for. The token-token scores are exactly MPNet's (q.k / sqrt(d) + bias); only the softmax also sees
the prefix columns, whose scores are q.k_prefix / sqrt(d).
"""
from __future__ import annotations

from .sites import PrefixAttentionSite


class MPNetPrefixAttentionSite(PrefixAttentionSite):
    """PrefixAttentionSite for `MPNetSelfAttention`: passes the relative position bias on as the token-token score
    bias and applies the module's own output projection `o` (a site wrapper included: LoRA/BitFit on `o`)."""

    OUTPUT_PROJECTION = "o"

    def forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
        active = self._state.active
        if self._prefix.get(active) is None and self._replace.get(active) is None:
            return self.base(hidden_states, attention_mask, position_bias, output_attentions=output_attentions, **kwargs)
        if output_attentions:
            raise NotImplementedError("output_attentions is not supported with prefix-tuning (SDPA computes no weights)")
        context, _ = super().forward(hidden_states, attention_mask, score_bias=position_bias)
        return (self.base.get_submodule(self.OUTPUT_PROJECTION)(context),)
