"""group.attention_dropout=fused (grouping/attention.py): a grouped training step computes its attention in one SDPA
kernel that draws the dropout masks on the probabilities itself. No per-run noise is drawn for them and no
probabilities are written by the step; the training is reproducible, the setting is validated, splits groups and is
stated in records. The default (per_run) keeps every run's masks its own (tests/test_grouping.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_group_activations import assert_group_setting_splits_and_is_stated, one_step, traffic_of_one_step
from test_grouping import MIXED, build_group, config, dropout_encoder

import unipelt.grouping.attention as attention
from unipelt.grouping.attention import fused_dropout_attention
from unipelt.grouping.trainer import GroupTrainer
from unipelt.plan import ConfigError, plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from group_step_traffic import Traffic  # noqa: E402  (bytes counted as the benchmark counts them)


def trainer_for(tmp_path, mode: str, specs=MIXED, **kw) -> GroupTrainer:
    model, runs = build_group(specs, tmp_path / mode, epochs=2, encoder=dropout_encoder)
    return GroupTrainer(model, runs, 0, 24, "cpu", progress=False, attention_dropout=mode, **kw)


def test_fused_attention_dropout_draws_no_probability_noise_and_moves_fewer_bytes(tmp_path):
    found = {}
    for mode in ("per_run", "fused"):
        trainer = trainer_for(tmp_path, mode)
        traffic = traffic_of_one_step(trainer)
        layout = trainer.engine.noise_layout
        probs_sites = [name for name in layout.sites if isinstance(name, tuple) and name[0] == "probs"]
        uniform = sum(nbytes for op, *_, nbytes in traffic.rows if op == "uniform_")
        found[mode] = (probs_sites, layout.row_size, layout.prefix_row_size, uniform)
    (sites_p, row_p, prefix_p, uniform_p), (sites_f, row_f, prefix_f, uniform_f) = found["per_run"], found["fused"]
    assert len(sites_p) == 2 and sites_f == []  # one probability site per layer, none when fused
    assert prefix_p > 0 and prefix_f == 0  # the prefix runs' second block held only probability noise
    assert row_f < row_p and uniform_f < 0.5 * uniform_p, (uniform_f, uniform_p)  # the hidden dropouts' noise only
    # (on a CPU, SDPA with dropout falls back to its math form, which writes the probabilities; on a GPU it is one
    # fused kernel: test_fused_attention_dropout_on_cuda_is_one_kernel_that_writes_no_probabilities)


def test_fused_attention_with_dropout_is_unbiased_and_scaled_like_the_attention_without_it():
    """Inverted dropout on the probabilities: averaged over many draws, the output is the dropout-free attention,
    and single draws differ from it (the dropout is on); prefix columns and a padding mask included."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=g) for _ in range(3))
    mask = torch.ones(3, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.manual_seed(1)
    draws = torch.stack([fused_dropout_attention(q, k, v, mask, 0.2, 0.3) for _ in range(4000)])
    assert (draws[0] - exact).abs().max() > 0.01
    torch.testing.assert_close(draws.mean(0), exact, atol=0.03, rtol=0)


def test_the_engine_computes_training_attention_fused_with_the_encoders_rate_and_evaluation_without_dropout(
        tmp_path, monkeypatch):
    calls = []
    real = attention.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("dropout_p", 0.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    trainer = trainer_for(tmp_path, "fused")
    trainer._start()
    one_step(trainer, Traffic())
    assert calls == [0.1, 0.1]  # one per layer, at the encoder's attention_probs_dropout_prob
    calls.clear()
    trainer.evaluate_dev(list(trainer.runs))
    assert calls and all(p == 0.0 for p in calls)  # the evaluation never drops


def test_fused_attention_dropout_trains_reproducibly_and_close_to_the_per_run_masks(tmp_path):
    """The fused masks come from the default generator, seeded at every round from the first run's seed: the same
    group trains the same twice, also queued (runs joining re-seed torch to build their modules), while its losses
    differ from the per-run masks' only as other dropout masks make them differ."""
    results = {}
    for name, mode, slots in (("fused", "fused", None), ("again", "fused", None), ("per_run", "per_run", None),
                              ("queued", "fused", 3), ("queued_again", "fused", 3)):
        trainer = trainer_for(tmp_path / name, mode, slots=slots)
        trainer.step_losses = {}
        if "again" in name:
            torch.manual_seed(12345)  # another global state before training: the trainer's own seeding must decide
        trainer.fit()
        results[name] = trainer.step_losses
    assert results["fused"] == results["again"] and results["queued"] == results["queued_again"]
    fused, per_run = results["fused"], results["per_run"]
    assert fused.keys() == per_run.keys() and len(fused) == len(MIXED)
    diffs = [abs(a - b) for n in fused for a, b in zip(fused[n], per_run[n], strict=True)]
    assert any(d > 1e-4 for d in diffs)  # other masks
    mean = lambda losses: sum(sum(v) for v in losses.values()) / sum(len(v) for v in losses.values())  # noqa: E731
    assert abs(mean(fused) - mean(per_run)) < 0.05, (mean(fused), mean(per_run))


def test_group_attention_dropout_is_validated_splits_groups_and_is_stated_in_records(tmp_path):
    with pytest.raises(ConfigError, match="group.attention_dropout must be one of per_run, fused, got 'flash'"):
        plan(config("method=lora", "group.attention_dropout=flash"))
    with pytest.raises(ValueError, match="attention_dropout must be one of per_run, fused, got 'sdpa'"):
        trainer_for(tmp_path, "sdpa")
    # a record from before the setting trained with each run's own masks: same result config as per_run
    assert_group_setting_splits_and_is_stated("attention_dropout", "fused", "per_run")


def test_a_sweep_with_fused_attention_dropout_records_it(tmp_path):
    """Through the runner (what `unipelt -m` and experiments/sweep.py call): the setting reaches the group's trainer
    (other masks, so other losses) and every record states it."""
    from test_grouping import TINY

    from unipelt.grouping.runner import execute_many

    def cfgs(runs_dir, *extra):
        return [config(*TINY, f"method={m}", "train.epochs=2", f"output.runs_dir={runs_dir}",
                       "output.save_modules=false", *extra) for m in ("bitfit", "unipelt_apl")]

    fused = execute_many(cfgs(tmp_path / "fused", "group.attention_dropout=fused"))
    per_run = execute_many(cfgs(tmp_path / "per_run"))
    assert [o.status for o in fused] == [o.status for o in per_run] == ["complete"] * 2
    for f, p in zip(fused, per_run):
        assert f.record["group_size"] == p.record["group_size"] == 2
        assert f.record["config"]["group"]["attention_dropout"] == "fused"
        assert p.record["config"]["group"]["attention_dropout"] == "per_run"
        assert [h["train_loss"] for h in f.record["history"]] != [h["train_loss"] for h in p.record["history"]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
def test_fused_attention_dropout_on_cuda_is_one_kernel_that_writes_no_probabilities():
    """At a grouped step's shapes (prefix columns, padding mask, bf16): forward and backward run a fused SDPA
    operator; nothing of the probabilities' shape is written, unlike the per-run path's explicit attention."""
    rows, heads, length, prefix, dim = 48, 12, 64, 10, 32
    q = torch.randn(rows, heads, length, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(rows, heads, prefix + length, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    mask = torch.ones(rows, 1, 1, prefix + length, dtype=torch.bool, device="cuda")
    mask[::2, ..., -20:] = False
    traffic = Traffic()
    with traffic:
        fused_dropout_attention(q, k, v, mask, 0.1, dim ** -0.5).float().square().sum().backward()
    ops = {op for op, *_ in traffic.rows}
    assert any(op.startswith("_scaled_dot_product_") and op != "_scaled_dot_product_attention_math" for op in ops), ops
    assert "_softmax" not in ops and "bmm" not in ops, ops
    assert not [shape for _, shape, *_ in traffic.rows if shape == (rows, heads, length, prefix + length)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
def test_fused_attention_dropout_on_cuda_graphed_steps_is_reproducible_and_trains_like_the_eager_steps(tmp_path):
    """On a GPU, captured steps re-seeded between replays: the graphed group trains the same twice, and like the
    eager fused group up to other masks (the capture's warm-up draws from the stream too)."""
    from test_group_graphs import fit, queued_group, sdpa_dropout_encoder

    losses = {}
    for name, graphed in (("graphed", True), ("again", True), ("eager", False)):
        model, runs = queued_group(tmp_path / name, device="cuda", encoder=sdpa_dropout_encoder,
                                   mixed_precision="bf16")
        extra = {"graph_bucket": 1} if graphed else {}
        trainer, _, _ = fit(model, runs, device="cuda", slots=3, cuda_graph=graphed, mixed_precision="bf16",
                            attention_dropout="fused", **extra)
        losses[name] = trainer.step_losses
    assert losses["graphed"].keys() == losses["again"].keys()
    for name, graphed in losses["graphed"].items():  # bit for bit (the NaN run's NaN included)
        torch.testing.assert_close(torch.tensor(losses["again"][name]), torch.tensor(graphed), rtol=0, atol=0,
                                   equal_nan=True)
    for name, eager in losses["eager"].items():
        graphed = torch.tensor(losses["graphed"][name])
        finite = torch.isfinite(graphed)
        assert torch.equal(finite, torch.isfinite(torch.tensor(eager)))  # the NaN run fails either way
        assert abs(graphed[finite].mean() - torch.tensor(eager)[finite].mean()) < 0.1
