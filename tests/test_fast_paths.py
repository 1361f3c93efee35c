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
