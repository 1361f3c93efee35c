"""Graphed grouped training steps (group.cuda_graph, unipelt/grouping/graphs.py): the static-buffer step trains
exactly what the eager grouped step trains, padding to width buckets changes nothing beyond float rounding, and
the setting is validated, recorded and keeps graphed and eager runs in separate groups. The captured graph itself
is checked on a GPU (the CUDA test at the end; skipped without one)."""
from __future__ import annotations

import pytest
import torch
from test_grouping import MIXED, build_group, config

from unipelt.grouping.runner import graph_settings, group_key, partition
from unipelt.grouping.trainer import GroupTrainer, RowBank
from unipelt.plan import plan
from unipelt.training.batching import Encoded


def fit(model, runs, device="cpu", **kw):
    trainer = GroupTrainer(model, runs, 0, 24, device, progress=False, **kw)
    trainer.step_losses = {}
    widths = []
    real = trainer.engine.forward.__func__

    def spy(engine, names, input_ids, *a, **k):
        if torch.is_grad_enabled():
            widths.append(input_ids.shape[1])
        return real(engine, names, input_ids, *a, **k)

    type(trainer.engine).forward = spy
    try:
        trainer.fit()
    finally:
        type(trainer.engine).forward = real
    params = {r.name: {k: p.detach().clone() for k, p in model.trainable_named_parameters(r.name).items()}
              for r in runs}
    return trainer, params, widths


def nan_as_text(losses: dict) -> dict:
    return {k: [x if x == x else "nan" for x in v] for k, v in losses.items()}


def sdpa_dropout_encoder():
    """dropout_encoder with SDPA attention, as real encoders load: with eager attention transformers builds a padding
    mask from host tensors inside the forward, which a CUDA graph cannot capture (the grouped engine passes its mask
    to its own attention, so the encoder's attention implementation changes nothing else)."""
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               vocab_size=100, max_position_embeddings=64, hidden_dropout_prob=0.1,
                               attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    return AutoModel.from_config(cfg, attn_implementation="sdpa")


def queued_group(root, device="cpu", **settings):
    """7 mixed runs (every method, prefix included) of 1-3 epochs in 3 slots, one of them diverging: the live set
    changes within and between epochs and the group is re-formed, so graphs are dropped and made anew."""
    model, runs = build_group(MIXED[:7], root, **settings)
    for run, n in zip(runs, [1, 3, 2, 3, 1, 2, 3]):
        run.settings.epochs = n
    runs[4].settings.inject_nan_at_step = 2
    if device != "cpu":
        model.to(device)
    return model, runs


def test_the_static_buffer_step_trains_exactly_like_the_eager_grouped_step(tmp_path):
    """With 1-token buckets (no padding) the graphed step's static path (what a GPU captures) gives bit-identical
    per-step losses, statuses, dev metrics and weights to the eager step, through slot changes and a NaN run."""
    eager_model, eager_runs = queued_group(tmp_path / "eager")
    eager, eager_params, eager_widths = fit(eager_model, eager_runs, slots=3)
    model, runs = queued_group(tmp_path / "graphed")
    graphed, params, widths = fit(model, runs, slots=3, cuda_graph=True, graph_bucket=1)
    assert graphed.step_graphs.eager_steps == len(widths)  # every step went through the static path
    assert widths == eager_widths
    assert nan_as_text(graphed.step_losses) == nan_as_text(eager.step_losses)  # exact
    assert [r.status for r in runs] == [r.status for r in eager_runs] and runs[4].status == "failed"
    for run, ref in zip(runs, eager_runs):
        if run.status == "done":
            assert run.result.dev_metrics == ref.result.dev_metrics
            assert run.result.history == [{**h, "epoch_s": run.result.history[i]["epoch_s"]}
                                          for i, h in enumerate(ref.result.history)]
        for key, value in eager_params[ref.name].items():  # the failed run's are NaN in both
            torch.testing.assert_close(params[run.name][key], value, rtol=0, atol=0, equal_nan=True)


def test_bucketed_widths_pad_batches_and_train_each_run_as_unpadded_within_float_noise(tmp_path):
    """16-token buckets: every training batch is padded to a multiple of 16 (or the max length, 24); the padding is
    masked everywhere, so every run's losses and weights are those of the unpadded step (fp32, 1e-5)."""
    ref_model, ref_runs = build_group(MIXED, tmp_path / "ref")
    ref, ref_params, ref_widths = fit(ref_model, ref_runs)
    model, runs = build_group(MIXED, tmp_path / "bucketed")
    graphed, params, widths = fit(model, runs, cuda_graph=True)
    assert set(widths) <= {16, 24} and len(widths) == len(ref_widths)
    assert any(w != r for w, r in zip(widths, ref_widths))  # the padding really changed the shapes
    assert graphed.graph_bucket == 16
    for name, losses in ref.step_losses.items():
        assert torch.allclose(torch.tensor(graphed.step_losses[name]), torch.tensor(losses), atol=1e-5), name
        for key, value in ref_params[name].items():
            assert torch.allclose(params[name][key], value, atol=1e-5), (name, key)


def test_row_bank_widths_follow_the_bucket_and_never_cut_a_row():
    data = Encoded([[1] * n for n in (3, 17, 30, 5)], None, torch.zeros(4, dtype=torch.long))
    plain = RowBank([data], 0, "cpu")
    bucketed = RowBank([data], 0, "cpu", bucket=16, max_length=40)
    capped = RowBank([data], 0, "cpu", bucket=16, max_length=30)
    for rows, want_plain, want_bucketed, want_capped in (([0], 3, 16, 16), ([0, 3], 5, 16, 16),
                                                        ([1], 17, 32, 30), ([2, 0], 30, 32, 30)):
        for bank, want in ((plain, want_plain), (bucketed, want_bucketed), (capped, want_capped)):
            b = bank.batch(rows)
            assert b["input_ids"].shape == (len(rows), want)
            assert b["attention_mask"].sum(1).tolist() == [len(data.input_ids[i]) for i in rows]


def test_group_cuda_graph_is_validated_recorded_and_never_merges_graphed_with_eager_runs(tmp_path):
    model, runs = build_group(MIXED[:1], tmp_path / "bad")
    with pytest.raises(ValueError, match="cuda_graph must be true or false, got 'yes'"):
        GroupTrainer(model, runs, 0, 24, "cpu", cuda_graph="yes")
    with pytest.raises(ValueError, match="graph_bucket must be a positive integer or None, got 0"):
        GroupTrainer(model, runs, 0, 24, "cpu", cuda_graph=True, graph_bucket=0)
    # group.cuda_graph=maybe and group.graph_bucket=0 are refused like every group setting (test_grouping.py:
    # test_bad_group_settings_are_clear_errors_and_touch_nothing)
    base = ["task=rte", "data.k=100", "method=lora"]
    plans = [plan(config(*o)) for o in (base, [*base, "data.seed=222", "group.cuda_graph=true"],
                                        [*base, "data.seed=333", "group.cuda_graph=true", "group.graph_bucket=32"],
                                        [*base, "data.seed=444", "group.cuda_graph=true", "group.graph_bucket=16"])]
    assert [graph_settings(p.config) for p in plans] == [(False, None), (True, None), (True, 32), (True, 16)]
    assert len({group_key(p) for p in plans}) == 4
    assert [len(g) for g in partition(plans, max_runs=16)] == [1, 1, 1, 1]
    # records of before the option count as ungraphed: they are not re-run with the default
    from unipelt.training.record import config_diff

    old = {k: v for k, v in plans[0].config.items()}
    old["group"] = {k: v for k, v in old["group"].items() if k not in ("cuda_graph", "graph_bucket")}
    assert config_diff(old, plans[0].config) == []
    assert "group.cuda_graph: (absent, i.e. False) -> True" in config_diff(old, plans[1].config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
def test_captured_group_steps_replay_the_eager_static_step_on_cuda(tmp_path):
    """On a GPU the graphed steps are captured and replayed (fewer eager steps than steps), and they train what the
    eager grouped step trains on the same padded batches (fp32; graphs replay the same kernels)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ref_model, ref_runs = queued_group(tmp_path / "eager", device="cuda", encoder=sdpa_dropout_encoder)
    ref, ref_params, _ = fit(ref_model, ref_runs, device="cuda", slots=3, cuda_graph=False)
    model, runs = queued_group(tmp_path / "graphed", device="cuda", encoder=sdpa_dropout_encoder)
    trainer, params, widths = fit(model, runs, device="cuda", slots=3, cuda_graph=True, graph_bucket=1)
    graphs = trainer.step_graphs
    assert graphs.captures > 0 and graphs.replays > 0 and graphs.eager_steps < len(widths)
    assert [r.status for r in runs] == [r.status for r in ref_runs]
    for name, losses in ref.step_losses.items():  # the NaN run's are NaN in both
        torch.testing.assert_close(torch.tensor(trainer.step_losses[name]), torch.tensor(losses), rtol=0, atol=1e-5,
                                   equal_nan=True)
        for key, value in ref_params[name].items():
            torch.testing.assert_close(params[name][key], value, rtol=0, atol=1e-5, equal_nan=True)


def test_a_sweep_with_group_cuda_graph_records_it_and_scores_like_the_eager_sweep(tmp_path):
    """Through the runner (what `unipelt -m` and experiments/sweep.py call): two runs with group.cuda_graph=true train
    in one group, their records carry the setting, and their scores are those of the eager group (fp32 CPU: the
    padding only changes rounding)."""
    from test_grouping import TINY

    from unipelt.grouping.runner import execute_many

    def cfgs(runs_dir, *extra):
        return [config(*TINY, f"method={m}", "train.epochs=2", f"output.runs_dir={runs_dir}",
                       "output.save_modules=false", *extra) for m in ("lora", "unipelt_apl")]

    graphed = execute_many(cfgs(tmp_path / "graphed", "group.cuda_graph=true", "group.graph_bucket=8"))
    eager = execute_many(cfgs(tmp_path / "eager"))
    assert [o.status for o in graphed] == [o.status for o in eager] == ["complete"] * 2
    for g, e in zip(graphed, eager):
        assert g.record["group_size"] == e.record["group_size"] == 2
        assert g.record["config"]["group"]["cuda_graph"] is True and g.record["config"]["group"]["graph_bucket"] == 8
        assert e.record["config"]["group"]["cuda_graph"] is False
        assert g.record["test_score"] == pytest.approx(e.record["test_score"], abs=1e-5)
        assert [h["train_loss"] for h in g.record["history"]] == pytest.approx(
            [h["train_loss"] for h in e.record["history"]], abs=1e-5)
