"""Whole-step CUDA graphs (training/cuda_graph.py) train exactly what the plain loop trains.

On CPU the graphed step runs its static-buffer code without capture; the test on CUDA (run on the lent GPU:
`python -m pytest tests/test_cuda_graph.py`) checks the captured, replayed graph against the plain loop.
"""
from __future__ import annotations

import pytest
import torch
from helpers import model_with, randomize_

from unipelt.training.cuda_graph import GraphedTrainStep, capturable_adamw


def _batches(n: int, b: int = 4, t: int = 9, vocab: int = 100, short_every: int = 3):
    """Fixed-shape batches with padding, and every `short_every`-th batch of another shape (a short last batch)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        rows = 2 if (i + 1) % short_every == 0 else b
        ids = torch.randint(1, vocab, (rows, t), generator=g)
        mask = torch.ones(rows, t, dtype=torch.long)
        mask[0, t - 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (rows,), generator=g)})
    return out


def _train_plain(model, batches, lr, device):
    params = list(model.trainable_named_parameters().values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    torch.manual_seed(3)  # the same dropout stream for both loops
    losses = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _train_graphed(model, batches, lr, device):
    params = list(model.trainable_named_parameters().values())
    opt = capturable_adamw(params, lr, device=device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # fills the LR tensor in place
    step = GraphedTrainStep(lambda b: model(**b).loss, opt, device, warmup=2)
    torch.manual_seed(3)
    losses = []
    for batch in batches:
        loss = step({k: v.to(device) for k, v in batch.items()})
        losses.append(loss.item())  # read before the next step overwrites the static loss
        sched.step()
    return losses, step


def _pair(method: str, device):
    """Two identical models (built twice from the same seeds: a PeltModel cannot be deep-copied)."""
    pair = []
    for _ in range(2):
        model = model_with(method)
        randomize_(model.tasks["t"])
        pair.append(model.train().to(device))
    return pair


def _assert_same_training(plain, graphed, plain_losses, graphed_losses, atol):
    assert plain_losses == pytest.approx(graphed_losses, abs=atol)
    changed = 0
    graphed_params = graphed.trainable_named_parameters()
    for name, p in plain.trainable_named_parameters().items():
        assert torch.allclose(p, graphed_params[name], atol=atol), name
        changed += 1
    assert changed > 0


@pytest.mark.parametrize("method", ["lora", "unipelt_apl"])
def test_graphed_step_on_cpu_trains_like_the_plain_loop(method):
    device = torch.device("cpu")
    plain, graphed = _pair(method, device)
    before = {n: p.detach().clone() for n, p in plain.trainable_named_parameters().items()}
    batches = _batches(8)
    plain_losses = _train_plain(plain, batches, 1e-2, device)
    graphed_losses, step = _train_graphed(graphed, batches, 1e-2, device)
    _assert_same_training(plain, graphed, plain_losses, graphed_losses, atol=1e-5)
    # the other-shaped batches (every 3rd) took the plain path, the rest the static-buffer path
    assert step.eager_steps == 8 and step.seen == 6
    moved = [n for n, p in graphed.trainable_named_parameters().items() if not torch.equal(p, before[n])]
    assert len(moved) > 0


def test_static_loss_is_overwritten_by_the_next_step_so_callers_read_it_first():
    device = torch.device("cpu")
    model = model_with("lora").train()
    opt = capturable_adamw(list(model.trainable_named_parameters().values()), 1e-2)
    step = GraphedTrainStep(lambda b: model(**b).loss, opt, device, warmup=0)
    batches = _batches(2, short_every=99)
    first = step(batches[0]).item()
    assert step.static_batch["input_ids"].data_ptr() != batches[0]["input_ids"].data_ptr()
    assert torch.equal(step.static_batch["input_ids"], batches[0]["input_ids"])
    second = step(batches[1]).item()
    assert torch.equal(step.static_batch["input_ids"], batches[1]["input_ids"])  # same buffer, new content
    assert first != second


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
@pytest.mark.parametrize("method", ["lora", "prefix", "unipelt_apl"])
def test_captured_graph_trains_like_the_plain_loop_on_cuda(method):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    plain, graphed = _pair(method, device)
    batches = _batches(12)
    plain_losses = _train_plain(plain, batches, 1e-2, device)
    graphed_losses, step = _train_graphed(graphed, batches, 1e-2, device)
    assert step.graph is not None and step.replays == 12 - 4 - 2  # 12 batches: 4 short, 2 warm-up, then replays
    _assert_same_training(plain, graphed, plain_losses, graphed_losses, atol=1e-4)
