"""The group's persistent parameter stacks and the AdamW that steps them (unipelt/grouping/stacks.py)."""
from __future__ import annotations

import torch

from unipelt.grouping.stacks import ParameterStacks, StackedAdamW

SHAPES = [(3, 4), (5,)]


def members_and_stacks(lrs, wds, seed=0):
    """Three members; member 1 lacks the (5,)-shaped tensor (a zero stand-in in that stack)."""
    g = torch.Generator().manual_seed(seed)
    params = [[torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES] for _ in lrs]
    stacks = ParameterStacks(len(lrs))
    stacks.add("a", [p[0] for p in params])
    stacks.add("b", [p[1] if i != 1 else torch.zeros(5) for i, p in enumerate(params)])
    optimizers = [torch.optim.AdamW(p if i != 1 else p[:1], lr=lr, weight_decay=wd)
                  for i, (p, lr, wd) in enumerate(zip(params, lrs, wds))]
    return params, stacks, optimizers


def test_parameters_become_views_of_their_stack_and_get_their_own_storage_back():
    params, stacks, _ = members_and_stacks([1e-3] * 3, [0.0] * 3)
    before = params[2][0].detach().clone()
    leaf = stacks.get("a").leaf
    assert torch.equal(leaf[2], before)
    with torch.no_grad():
        leaf[2].add_(1.0)
    assert torch.equal(params[2][0], before + 1)  # the run's tensor is its row of the stack
    with torch.no_grad():
        params[0][0].mul_(0)  # and a write to it (loading a best state) lands in the stack
    assert torch.equal(leaf[0], torch.zeros(3, 4))
    stacks.release()
    with torch.no_grad():
        leaf.add_(5.0)
    assert torch.equal(params[2][0], before + 1)  # storage of its own again


def test_stacked_adamw_is_each_runs_own_adamw_with_rows_of_idle_runs_and_stand_ins_untouched():
    lrs, wds = [1e-2, 3e-3, 5e-2], [0.0, 0.01, 0.1]
    params, stacks, optimizers = members_and_stacks(lrs, wds)
    reference = [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in params]
    ref_opts = [torch.optim.AdamW(p if i != 1 else p[:1], lr=lr, weight_decay=wd)
                for i, (p, lr, wd) in enumerate(zip(reference, lrs, wds))]
    adam = StackedAdamW(stacks, optimizers)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        live = [0, 1, 2] if step % 3 else [0, 2]  # member 1 sits some steps out (at another step count then)
        grads = {key: torch.randn(stacks.get(key).leaf.shape, generator=g) for key in ("a", "b")}
        idle_rows = {key: stacks.get(key).leaf.detach().clone() for key in ("a", "b")}
        for key, grad in grads.items():
            stacks.get(key).leaf.grad = grad
        adam.step(live)
        for m in live:
            for j, key in enumerate(("a", "b")):
                if m == 1 and key == "b":
                    continue
                reference[m][j].grad = grads[key][m].clone()
            ref_opts[m].step()
        for key in ("a", "b"):
            for m in {0, 1, 2} - set(live):
                assert torch.equal(stacks.get(key).leaf[m], idle_rows[key][m])
        assert torch.equal(stacks.get("b").leaf[1], torch.zeros(5))  # a stand-in stays zero (it has a gradient)
    for m in range(3):
        for j in range(2):
            if m == 1 and j == 1:
                continue
            torch.testing.assert_close(params[m][j].detach(), reference[m][j].detach(), rtol=0, atol=1e-6)
    assert adam.steps == [6, 4, 6]


def test_exported_state_resumes_like_an_uninterrupted_optimizer():
    lrs, wds = [1e-2, 2e-2, 5e-3], [0.01] * 3
    g = torch.Generator().manual_seed(2)
    grads = [{key: torch.randn(3, *((3, 4) if key == "a" else (5,)), generator=g) for key in ("a", "b")}
             for _ in range(5)]

    def run(split: bool):
        params, stacks, optimizers = members_and_stacks(lrs, wds)
        adam = StackedAdamW(stacks, optimizers)
        for i, grad in enumerate(grads):
            if split and i == 3:  # "checkpoint": optimizer state dicts + values, then a fresh group resumes
                for m in range(3):
                    adam.export_to(m)
                saved = [o.state_dict() for o in optimizers]
                values = [[p.detach().clone() for p in ps] for ps in params]
                params, stacks, optimizers = members_and_stacks(lrs, wds, seed=9)
                with torch.no_grad():
                    for ps, vs in zip(params, values):
                        for p, v in zip(ps, vs):
                            p.copy_(v)
                for o, sd in zip(optimizers, saved):
                    o.load_state_dict(sd)
                adam = StackedAdamW(stacks, optimizers)
            for key, value in grad.items():
                stacks.get(key).leaf.grad = value.clone()
            adam.step([0, 1, 2])
        return [[p.detach().clone() for p in ps] for ps in params], adam.steps

    (whole, steps), (resumed, resumed_steps) = run(False), run(True)
    assert steps == resumed_steps == [5, 5, 5]
    for a, b in zip(whole, resumed):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-7)
