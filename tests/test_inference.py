"""Fast prediction (unipelt/inference.py, GraphedForward): bucketed, graphed, prefix-folded inference predicts what the
plain eager forward predicts. On CPU the static-buffer code runs without capture; the CUDA tests run on the GPU."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import model_with, randomize_

from unipelt import predict  # the package exports the deployment path
from unipelt.inference import graph_shapes, logits_in_order
from unipelt.training.batching import Encoded, eval_batches
from unipelt.training.cuda_graph import GraphedForward


def _data(n: int = 23, seed: int = 3, vocab: int = 100) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    ids = [[1] + torch.randint(2, vocab, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]
    return Encoded(ids, None, torch.tensor([i % 2 for i in range(n)]))


def _plain_logits(model, data: Encoded) -> torch.Tensor:
    """One row at a time, unpadded: the reference no batching or padding can change."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).logits
                          for ids in data.input_ids])


def test_eval_batches_pad_to_bucket_widths_and_keep_every_row_once():
    data = _data()
    longest = max(len(i) for i in data.input_ids)
    seen = []
    for batch in eval_batches(data, 4, 0, pad_multiple=8):
        width = batch["input_ids"].shape[1]
        rows = batch["index"].tolist()
        assert width == min(longest, -(-max(len(data.input_ids[i]) for i in rows) // 8) * 8) or width == longest
        assert width >= max(len(data.input_ids[i]) for i in rows)
        for r, i in enumerate(rows):  # the row's tokens, then padding masked out
            n = len(data.input_ids[i])
            assert batch["input_ids"][r, :n].tolist() == data.input_ids[i]
            assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (width - n)
        seen += rows
    assert sorted(seen) == list(range(len(data)))
    assert graph_shapes(data, 8) == -(-longest // 8) + 1


@pytest.mark.parametrize("method", ["lora", "unipelt_apl"])
def test_graphed_forward_on_cpu_gives_the_plain_logits_and_keeps_one_buffer_set_per_shape(method):
    model = model_with(method)
    randomize_(model.tasks)
    data = _data()
    want = _plain_logits(model, data)
    forward = GraphedForward(lambda b: model(**b).logits, "cpu", max_shapes=2)
    got = logits_in_order(forward, data, 4, 0, "cpu", pad_multiple=8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert len(forward.shapes) == 2  # the first two shapes have static buffers; the rest ran eagerly
    static = next(iter(forward.shapes.values()))
    assert static.batch["input_ids"].shape[0] == 4


def test_predict_folds_the_prefix_and_predicts_what_the_unfolded_model_predicts():
    model = model_with("unipelt_apl")
    randomize_(model.tasks)
    data = _data()
    want = _plain_logits(model, data)
    got = predict(model, data, pad_id=0, batch_size=5, bucket=8)
    assert model.active.methods["prefix"].folded  # the MLP is gone: the deployment form
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(predict(model, data, pad_id=0, batch_size=64, bucket=16, cuda_graph=True), want,
                               atol=1e-5, rtol=0)  # graphed (static buffers on CPU), other buckets: the same
    with pytest.raises(ValueError, match="mixed_precision must be 'no' or 'bf16', got 'fp16'"):
        predict(model, data, pad_id=0, mixed_precision="fp16")


def test_the_trainer_evaluates_through_graphs_under_cuda_graph_with_the_plain_predictions(tmp_path):
    from unipelt.data import get_task
    from unipelt.training.trainer import Trainer, TrainSettings

    model = model_with("unipelt_apl")
    randomize_(model.tasks)
    data = _data(n=30)
    acc = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"), is_main_process=True,
                          autocast=lambda: torch.autocast("cpu", enabled=False))
    preds = {}
    for graphed in (False, True):
        s = TrainSettings(cuda_graph=graphed, graph_bucket=8 if graphed else None, eval_batch_size=7)
        trainer = Trainer(model, get_task("rte"), data, data, s, 0, tmp_path, acc, progress=False)
        preds[graphed] = trainer.predict(data)[0]
        if graphed:
            (split_graphs,) = trainer._eval_graphs.values()
            assert len(split_graphs[1].shapes) >= 2  # bucket widths went through the graphed forward
        _, gates = trainer.predict(data, gate_stats=True)  # gate statistics: the eager path, as before
        assert set(gates) == {"adapter_ffn", "prefix", "lora_query", "lora_value"}
        assert all(0 < v < 1 for vs in gates.values() for v in vs)
    assert (preds[True] == preds[False]).all()
    assert (preds[False] == _plain_logits(model, data).argmax(-1).numpy()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
@pytest.mark.parametrize("method", ["lora", "unipelt_apl", "finetune"])
def test_captured_inference_graphs_give_the_eager_logits_on_cuda(method):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = model_with(method)
    randomize_(model.tasks)
    model.cuda()
    data = _data(n=40)
    want = logits_in_order(lambda b: model(**b).logits.detach(), data, 8, 0, "cuda", pad_multiple=None)
    forward = GraphedForward(lambda b: model(**b).logits, "cuda", max_shapes=graph_shapes(data, 8))
    first = logits_in_order(forward, data, 8, 0, "cuda", pad_multiple=8)  # warm-up (eager) for every shape
    second = logits_in_order(forward, data, 8, 0, "cuda", pad_multiple=8)  # captured, then replayed
    third = logits_in_order(forward, data, 8, 0, "cuda", pad_multiple=8)
    assert forward.replays > 0
    for got in (first, second, third):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("mixed_precision,tol", [("no", 1e-5), ("bf16", 2e-2)])
def test_compiled_predict_with_frozen_weights_predicts_the_eager_logits_and_never_stale_weights(mixed_precision, tol):
    """predict(compile=True): inductor with the weights folded in as constants gives the eager path's logits; a
    second call after the weights change compiles anew and follows them (frozen constants must not go stale)."""
    model = model_with("unipelt_apl")
    randomize_(model.tasks)
    data = _data(n=12)
    want = predict(model, data, pad_id=0, batch_size=4, bucket=32, mixed_precision=mixed_precision)
    got = predict(model, data, pad_id=0, batch_size=4, bucket=32, mixed_precision=mixed_precision, compile=True)
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    with torch.no_grad():
        model.active.head.out.bias.add_(torch.tensor([3.0, -3.0]))
    moved = predict(model, data, pad_id=0, batch_size=4, bucket=32, mixed_precision=mixed_precision, compile=True)
    torch.testing.assert_close(moved, want + torch.tensor([3.0, -3.0]), atol=tol, rtol=0)
    with pytest.raises(ValueError, match="compile must be true or false, got 'yes'"):
        predict(model, data, pad_id=0, compile="yes")
