"""Every fast path computes what the plain path computes (checked on CPU)."""
from __future__ import annotations

import pytest
import torch
from helpers import batch, model_with, randomize_

from unipelt.gates import Gate, GateBank
from unipelt.state import ForwardState


@pytest.mark.parametrize("pooling", ["masked", "all"])
def test_gate_bank_equals_each_gate_alone_in_values_and_gradients(pooling):
    torch.manual_seed(0)
    gates = [Gate(16, pooling) for _ in range(3)]
    for g in gates:
        torch.nn.init.normal_(g.proj.weight, std=0.5)
        torch.nn.init.normal_(g.proj.bias, std=0.5)
    hidden = torch.randn(4, 7, 16)
    mask = torch.ones(4, 7)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    alone = torch.stack([g(hidden, mask) for g in gates], 1)
    alone.sum().backward()
    grads_alone = [g.proj.weight.grad.clone() for g in gates]
    for g in gates:
        g.proj.weight.grad = None
    state = ForwardState()
    state.begin(mask, torch.float32)
    bank = GateBank(state, "layer0")
    values = [bank.add("t", g, lambda: hidden) for g in gates]
    together = torch.stack([v() for v in values], 1)
    assert torch.allclose(together, alone, atol=1e-6)
    together.sum().backward()
    for g, expected in zip(gates, grads_alone):
        assert torch.allclose(g.proj.weight.grad, expected, atol=1e-6)
        assert g.last is not None and g.last.shape == (4,)


def test_compiled_model_matches_eager_logits_and_gradients():
    eager = model_with("unipelt_aplb")
    randomize_(eager.tasks["t"])
    ids, mask = batch()
    labels = torch.tensor([0, 1, 1, 0])
    out = eager(ids, mask, labels=labels)
    out.loss.backward()
    expected_grads = {n: p.grad.clone() for n, p in eager.trainable_named_parameters().items()}
    for p in eager.trainable_named_parameters().values():
        p.grad = None
    compiled = torch.compile(eager, backend="aot_eager", fullgraph=True)  # fullgraph: fails on any graph break
    out_c = compiled(ids, mask, labels=labels)
    assert torch.allclose(out_c.logits, out.logits, atol=1e-5)
    out_c.loss.backward()
    for name, p in eager.trainable_named_parameters().items():
        assert torch.allclose(p.grad, expected_grads[name], atol=1e-5), name


def test_bucketed_batches_cover_each_example_once_with_less_padding():
    from unipelt.training.batching import Encoded, batches, epoch_order

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (200,), generator=g).tolist()
    data = Encoded([[1] * n for n in lengths], None, torch.zeros(200, dtype=torch.long))
    order = epoch_order(200, seed=42, epoch=1)

    def stats(bucket):
        seen, padded = [], 0
        for b in batches(data, order, 16, 0, bucket=bucket):
            seen += b["input_ids"].ne(0).sum(1).tolist()
            padded += b["attention_mask"].eq(0).sum().item()
        return sorted(seen), padded

    plain_seen, plain_pad = stats(False)
    bucket_seen, bucket_pad = stats(True)
    assert bucket_seen == plain_seen == sorted(lengths)
    assert bucket_pad < plain_pad / 2


@pytest.mark.slow
def test_trainer_with_compile_gives_the_same_record_metrics(tmp_path):
    from test_runner import config

    from unipelt.run import execute

    common = ["task=rte", "method=unipelt_apl", "model.num_layers=1", "data.k=8", "data.dev_size=16",
              "data.max_length=32", "train.epochs=2", "output.progress=false", "output.save_modules=false",
              "group.enabled=false"]  # compile is a switch of the per-run trainer: compare like with like
    plain = execute(config(*common, f"output.runs_dir={tmp_path / 'a'}"))
    fast = execute(config(*common, "train.compile=aot_eager", f"output.runs_dir={tmp_path / 'b'}"))
    assert fast["test_score"] == pytest.approx(plain["test_score"], abs=1e-6)
    assert fast["best_epoch"] == plain["best_epoch"]
    for name, values in plain["gates"].items():
        assert fast["gates"][name] == pytest.approx(values, abs=1e-5)


# --- fewer kernels per layer: one q/k/v matmul with a prefix, one LoRA down-projection for query + value ----------
def _logits_and_grads(model, ids, mask, labels):
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(11)  # the same dropout masks (head, modules) for both paths
    out = model(ids, mask, labels=labels)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, atol=1e-6):
    (logits_a, grads_a), (logits_b, grads_b) = a, b
    assert torch.allclose(logits_a, logits_b, atol=atol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=atol), name


@pytest.mark.parametrize("method, arch", [("unipelt_aplb", "bert"), ("unipelt_apl", "roberta"),
                                          ("unipelt_apl", "mpnet"), ("prefix", "bert")])
def test_fused_qkv_projection_equals_the_three_linears_and_skips_their_forward(method, arch, monkeypatch):
    """With a prefix the attention is recomputed from q, k, v: the three frozen linears run as one matmul over their
    concatenated weights, and each site (LoRA, BitFit) still adds its deltas. Same logits and gradients as the three
    separate linears; the linears' own forward is never called."""
    from unipelt.sites import PrefixAttentionSite

    model = model_with(method, arch=arch).train()
    randomize_(model.tasks["t"])
    model.encoder.apply(lambda m: setattr(m, "p", 0.0) if isinstance(m, torch.nn.Dropout) else None)
    ids, mask = batch()
    labels = torch.tensor([0, 1, 1, 0])
    calls = []
    sites = [m for m in model.modules() if isinstance(m, PrefixAttentionSite)]
    assert sites
    for site in sites:
        for path in site._paths.values():
            linear = site.base.get_submodule(path)
            linear = getattr(linear, "base", linear)
            linear.register_forward_hook(lambda *a: calls.append(1))
    fused = _logits_and_grads(model, ids, mask, labels)
    assert calls == []  # the fused matmul read the weights; no per-linear forward ran
    real = PrefixAttentionSite.projections
    monkeypatch.setattr(PrefixAttentionSite, "projections", lambda self, h, fused=True: real(self, h, fused=False))
    separate = _logits_and_grads(model, ids, mask, labels)
    assert len(calls) == 3 * len(sites)
    _assert_same(fused, separate)


def test_fused_qkv_projection_trains_the_encoder_weights_it_concatenates():
    """Full fine-tuning with a prefix: the concatenation is taken per forward, so gradients reach each linear's own
    weight and an optimizer step is seen by the next forward."""
    from unipelt import PeltConfig

    config = PeltConfig.from_dict({"methods": {"finetune": {}, "prefix": {}}})
    model = model_with(config).train()
    model.encoder.apply(lambda m: setattr(m, "p", 0.0) if isinstance(m, torch.nn.Dropout) else None)
    ids, mask = batch()
    labels = torch.tensor([0, 1, 1, 0])
    query = next(p for n, p in model.named_parameters() if n.endswith("query.weight"))
    logits, grads = _logits_and_grads(model, ids, mask, labels)
    assert query.grad is not None and query.grad.abs().sum() > 0
    with torch.no_grad():
        query.add_(torch.randn_like(query) * 0.5)
    assert not torch.allclose(model(ids, mask).logits, logits, atol=1e-4)


def test_lora_query_and_value_share_one_down_projection_with_the_same_results(monkeypatch):
    """LoRA on query and value (the default) computes [A_q; A_v] x once per layer and forward; each target takes its
    slice. Same logits and gradients as one A x per target; a target on another input (the attention output)
    keeps its own, and LoRA dropout (masks per target) turns the sharing off."""
    from unipelt import PeltConfig
    from unipelt.methods.lora import LoraMethod

    for method in ("lora", "unipelt_apl", PeltConfig.from_dict(
            {"methods": {"lora": {"targets": ["query", "value", "attn_output"]}}})):
        ids, mask = batch()
        labels = torch.tensor([0, 1, 1, 0])
        model = model_with(method).train()
        randomize_(model.tasks["t"])
        shared = _logits_and_grads(model, ids, mask, labels)
        keys = [k for k in model.state.cache if isinstance(k, tuple) and k[0] == "lora_down"]
        assert len(keys) == model.encoder.config.num_hidden_layers, method
        assert all(model.state.cache[k][1].shape[-1] == 16 for k in keys)  # r=8 for query and for value
        with monkeypatch.context() as m:  # the same model built with one A x per target
            m.setattr(LoraMethod, "_shared_down", lambda *a: None)
            alone = model_with(method).train()
        randomize_(alone.tasks["t"])
        separate = _logits_and_grads(alone, ids, mask, labels)
        assert not any(isinstance(k, tuple) and k[0] == "lora_down" for k in alone.state.cache)
        _assert_same(shared, separate)
    with_dropout = model_with(PeltConfig.from_dict({"methods": {"lora": {"dropout": 0.1}}})).train()
    with_dropout(*batch())
    assert not any(isinstance(k, tuple) and k[0] == "lora_down" for k in with_dropout.state.cache)
