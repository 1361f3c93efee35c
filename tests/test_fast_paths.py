"""Every fast path computes what the plain path computes (checked on CPU)."""
from __future__ import annotations

import pytest
import torch
from helpers import batch, model_with, randomize_

from unipelt.gates import Gate, GateBank
from unipelt.projections import ProjectionBank, stacked_linear
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
    projections = ProjectionBank(state, "layer0")
    other = torch.nn.Parameter(torch.randn(5, 16))  # another reader of the same tensor (as LoRA's A is)
    other_columns = projections.add("t", lambda: (other, None))
    bank = GateBank(state, "layer0", projections)
    values = [bank.add("t", g, lambda: hidden) for g in gates]
    together = torch.stack([v() for v in values], 1)
    assert torch.allclose(together, alone, atol=1e-6)
    assert torch.allclose(other_columns(hidden), hidden @ other.t(), atol=1e-6)
    assert [len(done) for k, done in state.cache.items() if k[0] == "projection_bank"] == [1]  # one matmul
    (together.sum() + other_columns(hidden).sum()).backward()
    for g, expected in zip(gates, grads_alone):
        assert torch.allclose(g.proj.weight.grad, expected, atol=1e-6)
        assert g.last is not None and g.last.shape == (4,)
    assert torch.allclose(other.grad, hidden.sum((0, 1)).expand(5, -1), atol=1e-5)


def test_stacked_linear_equals_each_linear_and_pads_its_output_rows_to_16_bytes():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    parts = [(torch.randn(n, 16, requires_grad=True), torch.randn(n, requires_grad=True) if i != 1 else None)
             for i, n in enumerate((4, 8, 1))]  # 13 rows, one part without a bias
    outs = stacked_linear(x, parts)
    assert [o.shape[-1] for o in outs] == [4, 8, 1]
    assert all(o.stride(-2) == 16 for o in outs)  # one (.., 16)-wide output: 13 columns + 3 of padding
    expected = [torch.nn.functional.linear(x, w, b) for w, b in parts]
    for o, e in zip(outs, expected):
        assert torch.allclose(o, e, atol=1e-6)
    sum(o.square().sum() for o in outs).backward()
    grads = [t.grad.clone() for t in (x, *[w for w, _ in parts], parts[0][1], parts[2][1])]
    for t in (x, *[w for w, _ in parts], parts[0][1], parts[2][1]):
        t.grad = None
    sum(e.square().sum() for e in expected).backward()
    for got, t in zip(grads, (x, *[w for w, _ in parts], parts[0][1], parts[2][1])):
        assert torch.allclose(got, t.grad, atol=1e-5)


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
    real = PrefixAttentionSite._linear_outputs
    monkeypatch.setattr(PrefixAttentionSite, "_linear_outputs", lambda self, h, fused=True: real(self, h, fused=False))
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


def _bank_parts(model) -> list[list[int]]:
    """The output widths of each projection-bank matmul of the last forward, one list per matmul."""
    return [[o.shape[-1] for o in outputs] for k, done in model.state.cache.items()
            if isinstance(k, tuple) and k[0] == "projection_bank" for _, outputs in done]


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
        parts = _bank_parts(model)
        assert len(parts) == model.encoder.config.num_hidden_layers, method
        assert all(16 in widths for widths in parts)  # r=8 for query and for value, one part
        with monkeypatch.context() as m:  # the same model built with one A x per target
            m.setattr(LoraMethod, "_shared_down", lambda *a: None)
            alone = model_with(method).train()
        randomize_(alone.tasks["t"])
        separate = _logits_and_grads(alone, ids, mask, labels)
        assert not any(16 in widths for widths in _bank_parts(alone))
        _assert_same(shared, separate)
    with_dropout = model_with(PeltConfig.from_dict({"methods": {"lora": {"dropout": 0.1}}})).train()
    with_dropout(*batch())
    assert _bank_parts(with_dropout) == []


def test_maps_of_one_tensor_run_as_one_matmul_with_the_same_results(monkeypatch):
    """unipelt_apl: per layer, the prefix gate, the two LoRA gates and [A_q; A_v] are one matmul of the layer input,
    and each adapter's down-projection and gate one matmul of the adapter's input. Same logits and gradients as one
    matmul per map."""
    import torch.nn.functional as F

    from unipelt import projections
    from unipelt.methods import adapter

    model = model_with("unipelt_apl").train()
    randomize_(model.tasks["t"])
    ids, mask = batch()
    labels = torch.tensor([0, 1, 1, 0])
    calls = []
    real = projections.stacked_linear

    def recording(x, parts):
        calls.append(sorted(w.shape[0] for w, _ in parts))
        return real(x, parts)

    for module in (projections, adapter):
        monkeypatch.setattr(module, "stacked_linear", recording)
    fused = _logits_and_grads(model, ids, mask, labels)
    layers, bottleneck = model.encoder.config.num_hidden_layers, model.tasks["t"].methods["adapter"].bottleneck_dim
    assert sorted(calls) == sorted([[3, 16]] * layers + [[1, bottleneck]] * layers)
    for module in (projections, adapter):
        monkeypatch.setattr(module, "stacked_linear", lambda x, parts: [F.linear(x, w, b) for w, b in parts])
    _assert_same(fused, _logits_and_grads(model, ids, mask, labels))


def _matmuls(fn) -> int:
    """How many matrix multiplications `fn()` runs (aten mm/addmm/bmm/baddbmm, counted as dispatched)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names = {"mm", "addmm", "bmm", "baddbmm"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in names:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("method, arch", [("unipelt_apl", "bert"), ("unipelt_aplb", "bert"), ("unipelt_apl", "mpnet")])
def test_lora_folds_into_the_fused_qkv_matmul_with_the_same_logits_and_gradients(method, arch, monkeypatch):
    """LoRA's up-projections for query and value join the fused q/k/v matmul ([x | u] @ [W | B]^T): two matmuls fewer
    per layer in inference, and in training also fewer in the backward (dx and du from one matmul, one weight
    gradient for both B). The same logits and gradients as adding each LoRA delta (BitFit's deltas on the same
    linears still added after)."""
    from unipelt.sites import ModuleSite

    model = model_with(method, arch=arch)
    randomize_(model.tasks["t"])
    ids, mask = batch()
    labels = torch.tensor([0, 1, 1, 0])
    layers = model.encoder.config.num_hidden_layers

    def run(fold: bool):
        with monkeypatch.context() as m:
            if not fold:
                m.setattr(ModuleSite, "factored", lambda self: [])
            model.eval()
            with torch.no_grad():
                infer_n = _matmuls(lambda: model(ids, mask))
                logits = model(ids, mask).logits
            model.train()
            train_n = _matmuls(lambda: _logits_and_grads(model, ids, mask, labels))
            return infer_n, train_n, logits, _logits_and_grads(model, ids, mask, labels)

    infer_f, train_f, logits_f, trained_f = run(True)
    infer_p, train_p, logits_p, trained_p = run(False)
    assert torch.allclose(logits_f, logits_p, atol=1e-6)
    _assert_same(trained_f, trained_p)
    assert infer_p - infer_f == 2 * layers
    # per layer: forward 2, backward 2 du + 1 dB; the first layer's input needs no gradient, so it computes du alone
    assert train_p - train_f == 5 * layers - 1


def test_lora_does_not_fold_where_the_frozen_weights_train():
    """Full fine-tuning + prefix + LoRA: q/k/v's weights train, so nothing folds (the widened weight's gradient would
    be wrong to skip); gradients still reach them."""
    from unipelt import PeltConfig

    model = model_with(PeltConfig.from_dict({"methods": {"finetune": {}, "prefix": {}, "lora": {}}})).train()
    randomize_(model.tasks["t"])
    ids, mask = batch()
    logits, grads = _logits_and_grads(model, ids, mask, torch.tensor([0, 1, 1, 0]))
    assert any(n.endswith("query.base.weight") and g.abs().sum() > 0 for n, g in grads.items())
    assert any("updates.query" in n and g.abs().sum() > 0 for n, g in grads.items())


def test_folded_lora_under_bf16_autocast_matches_the_unfolded_path(monkeypatch):
    from unipelt.sites import ModuleSite

    model = model_with("unipelt_apl").train()
    randomize_(model.tasks["t"])
    ids, mask = batch()
    labels = torch.tensor([0, 1, 1, 0])

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _logits_and_grads(model, ids, mask, labels)

    folded = run()
    with monkeypatch.context() as m:
        m.setattr(ModuleSite, "factored", lambda self: [])
        plain = run()
    assert torch.allclose(folded[0].float(), plain[0].float(), atol=3e-2)
    for name in plain[1]:
        assert folded[1][name].dtype == plain[1][name].dtype, name
        assert torch.allclose(folded[1][name], plain[1][name], atol=3e-2, rtol=5e-2), name
