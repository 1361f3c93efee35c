"""group.activations=bf16 (grouping/activations.py): the grouped step keeps its hidden states and attention
probabilities in bf16, moves fewer bytes, and trains close to the fp32 stream; the setting is validated, splits
groups and is stated in records."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_grouping import MIXED, build_group, config, dropout_encoder
from test_grouping_kernels import attention_inputs

from unipelt.grouping.activations import StreamLayerNorm
from unipelt.grouping.attention import dropout_attention
from unipelt.grouping.runner import partition
from unipelt.grouping.trainer import GroupTrainer
from unipelt.plan import ConfigError, plan
from unipelt.training.record import config_diff

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from group_step_traffic import Traffic  # noqa: E402  (bytes counted as the benchmark counts them)


STREAM_OPS = {"add", "add_", "native_layer_norm", "native_layer_norm_backward", "_softmax", "_softmax_backward_data",
              "gelu", "gelu_backward", "bmm", "mm", "addmm", "baddbmm", "cat", "sum"}


def stream_outputs(mode: Traffic) -> list:
    """(operator, shape, dtype) of the floating-point outputs of the operators that compute activations (not masks or
    noise), from the byte counter of experiments/group_step_traffic.py."""
    return [(op, shape, getattr(torch, dtype)) for op, shape, dtype, _ in mode.rows
            if op in STREAM_OPS and dtype in ("float32", "bfloat16", "float16")]


def total_bytes(mode: Traffic) -> int:
    return sum(nbytes for *_, nbytes in mode.rows)


def trainer_for(tmp_path, activations: str, specs=MIXED, arch: str = "bert", **kw) -> GroupTrainer:
    model, runs = build_group(specs, tmp_path / activations, epochs=2, mixed_precision="bf16",
                              encoder=lambda: dropout_encoder(arch))
    pad = 1 if arch == "roberta" else 0  # RoBERTa's padding id (its positions count from it)
    return GroupTrainer(model, runs, pad, 24, "cpu", mixed_precision="bf16", progress=False, activations=activations,
                        **kw)


def one_step(trainer: GroupTrainer, mode: Traffic) -> None:
    """One grouped training step of every run (4 rows each) under `mode`."""
    runs = list(trainer.runs)
    rows = [trainer.train_bank.offsets[r.index] + i for r in runs for i in range(4)]
    batch = trainer.train_bank.batch(rows)
    labels = batch.pop("labels")
    has_prefix = ["prefix" in trainer.model.tasks[r.name].methods for r in runs]
    trainer.model.train()
    with mode:
        trainer._eager_step(runs, batch, labels, None, [4] * len(runs), has_prefix, 4, [False] * len(runs))


def traffic_of_one_step(trainer) -> Traffic:
    """The operators and bytes of one eager step of a fresh trainer, after a warm-up step (optimizer state, stacks)."""
    trainer._start()
    one_step(trainer, Traffic())
    traffic = Traffic()
    one_step(trainer, traffic)
    return traffic


def test_bf16_activations_keep_every_hidden_state_and_probability_in_bf16_and_the_runs_parameters_fp32(tmp_path):
    found = {}
    for activations in ("fp32", "bf16"):
        trainer = trainer_for(tmp_path, activations)
        mode = traffic_of_one_step(trainer)
        rows = 4 * len(trainer.runs)
        # what the stream computes, forward and backward: hidden states (rows, T, 32), FFN activations (rows, T, 64),
        # attention probabilities (rows, heads, T, P + T) (dropout keep masks and noise are not activations)
        big = {dtype for op, shape, dtype in stream_outputs(mode) if len(shape) >= 3 and shape[0] == rows
               and shape[1] > 1}
        found[activations] = (big, total_bytes(mode))
        trainable = {p.dtype for r in trainer.runs for p in trainer.model.trainable_named_parameters(r.name).values()}
        assert trainable == {torch.float32}  # the runs' parameters, gradients and AdamW stay fp32
        frozen = {p.dtype for p in trainer.model.encoder.parameters()}
        norms = [type(m) for m in trainer.model.encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
        if activations == "bf16":
            assert frozen == {torch.bfloat16} and set(norms) == {StreamLayerNorm}
        else:
            assert torch.float32 in frozen and StreamLayerNorm not in norms
    assert torch.float32 in found["fp32"][0]  # the control: the default stream has fp32 activations
    assert found["bf16"][0] == {torch.bfloat16}
    assert found["bf16"][1] < 0.85 * found["fp32"][1], (found["bf16"][1], found["fp32"][1])  # 0.79 here; 0.60 at MiniLM size


@pytest.mark.parametrize("arch", ["bert", "roberta", "mpnet"])
def test_bf16_activations_train_each_run_close_to_the_fp32_stream(tmp_path, arch):
    """The same runs, data, noise and updates: only the stream's rounding differs, so every step's loss of every
    mixed run stays within bf16 noise of the fp32 stream's, and the dev metrics too (MPNet: with its relative
    position bias in the attention scores)."""
    results = {}
    for activations in ("fp32", "bf16"):
        trainer = trainer_for(tmp_path, activations, arch=arch)
        trainer.step_losses = {}
        trainer.fit()
        results[activations] = (trainer.step_losses, {r.name: r.result.history[-1]["dev_score"]
                                                      for r in trainer.runs})
    (losses32, dev32), (losses16, dev16) = results["fp32"], results["bf16"]
    assert losses32.keys() == losses16.keys() and len(losses32) == len(MIXED)
    diffs = [abs(a - b) for name in losses32 for a, b in zip(losses32[name], losses16[name], strict=True)]
    assert max(diffs) < 0.01, max(diffs)  # 1e-3 here
    assert any(d > 0 for d in diffs)  # it is another rounding, not the same computation
    assert all(abs(dev32[n] - dev16[n]) <= 2 / 9 for n in dev32)  # 9 dev rows: at most two change their prediction


def test_a_regrouped_bf16_group_builds_its_masks_in_fp32_as_before_the_cast(tmp_path):
    """Queued groups re-form their engine after the encoder was cast to bf16: the masks and gate pooling weights
    must not change dtype with it, or a run's numbers would depend on when it joined."""
    trainer = trainer_for(tmp_path, "bf16", specs=MIXED[:3], slots=2)
    first = trainer.engine.mask_dtype
    trainer._form()
    assert first == trainer.engine.mask_dtype == torch.float32


def test_compact_attention_probabilities_are_bf16_and_close_to_the_fp32_ones():
    results = []
    for compact in (False, True):
        (q, k, v), mask, tokens, cols = attention_inputs(torch.bfloat16, 4, False)
        mode = Traffic()
        with mode:
            out = dropout_attention(q, k, v, mask, tokens, cols, 0.1, 8 ** -0.5, compact=compact)
            out.float().square().sum().backward()
        probs = {dtype for _, shape, dtype in stream_outputs(mode) if shape in ((6, 3, 9, 13), (18, 9, 13))}
        results.append((probs, out.detach().float(), [t.grad.float() for t in (q, k, v)]))
    (probs32, out32, grads32), (probs16, out16, grads16) = results
    assert torch.float32 in probs32 and probs16 == {torch.bfloat16}
    torch.testing.assert_close(out16, out32, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads16, grads32):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


def test_group_activations_is_validated_splits_groups_and_is_stated_in_records():
    for overrides, message in ((["group.activations=fp16"], "group.activations must be one of fp32, bf16, got 'fp16'"),
                               (["group.activations=bf16"], "group.activations=bf16 needs train.mixed_precision=bf16")):
        with pytest.raises(ConfigError, match=message):
            plan(config("method=lora", *overrides))
    # a record from before the setting trained with the fp32 stream: same result config as fp32, not as bf16
    assert_group_setting_splits_and_is_stated("activations", "bf16", "fp32", ["train.mixed_precision=bf16"])


def assert_group_setting_splits_and_is_stated(name: str, value: str, legacy: str, extra=()) -> None:
    """group.<name>=<value> puts a run in another group than the default's, its record states it, and a record from
    before the setting existed counts as <legacy>, the default."""
    base = ["task=rte", "data.k=100", "method=lora", *extra]
    plans = [plan(config(*o)) for o in (base, [*base, "data.seed=222"], [*base, f"group.{name}={value}"])]
    assert [len(g) for g in partition(plans, max_runs=16)] == [2, 1]
    stated = plans[2].config
    assert stated["group"][name] == value
    old = {k: v for k, v in plans[0].config.items()}
    old["group"] = {k: v for k, v in old["group"].items() if k != name}
    assert config_diff(old, plans[0].config) == []
    assert config_diff(old, stated) == [f"group.{name}: (absent, i.e. {legacy!r}) -> {value!r}"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
def test_bf16_activations_on_cuda_graphed_replay_the_eager_steps_and_stay_close_to_the_fp32_stream(tmp_path):
    """On a GPU (fused noise in fp16, CUDA autocast, captured steps): the graphed bf16-stream steps train what the
    eager ones train, and both stay within bf16 noise of the fp32 stream, through slot changes and a NaN run."""
    from test_group_graphs import fit, queued_group, sdpa_dropout_encoder

    losses = {}
    for name, activations, graphed in (("eager", "bf16", False), ("graphed", "bf16", True), ("fp32", "fp32", True)):
        model, runs = queued_group(tmp_path / name, device="cuda", encoder=sdpa_dropout_encoder,
                                   mixed_precision="bf16")
        extra = {"graph_bucket": 1} if graphed else {}
        trainer, _, _ = fit(model, runs, device="cuda", slots=3, cuda_graph=graphed, mixed_precision="bf16",
                            activations=activations, **extra)
        assert {p.dtype for p in model.encoder.parameters()} >= {torch.bfloat16}
        losses[name] = trainer.step_losses
    for name, eager in losses["eager"].items():
        torch.testing.assert_close(torch.tensor(losses["graphed"][name]), torch.tensor(eager), rtol=0, atol=1e-5,
                                   equal_nan=True)
        torch.testing.assert_close(torch.tensor(losses["fp32"][name]), torch.tensor(eager), rtol=0, atol=2e-2,
                                   equal_nan=True)


def test_a_sweep_with_bf16_activations_records_it_and_trains_close_to_the_fp32_stream(tmp_path):
    """Through the runner (what `unipelt -m` and experiments/sweep.py call): the setting reaches the group's trainer
    (the losses move by bf16 rounding, not more) and every record states it."""
    from test_grouping import TINY

    from unipelt.grouping.runner import execute_many

    def cfgs(runs_dir, *extra):
        return [config(*TINY, f"method={m}", "train.epochs=2", "train.mixed_precision=bf16",
                       f"output.runs_dir={runs_dir}", "output.save_modules=false", *extra)
                for m in ("bitfit", "unipelt_apl")]

    bf16 = execute_many(cfgs(tmp_path / "bf16", "group.activations=bf16"))
    fp32 = execute_many(cfgs(tmp_path / "fp32"))
    assert [o.status for o in bf16] == [o.status for o in fp32] == ["complete"] * 2
    for b, f in zip(bf16, fp32):
        assert b.record["group_size"] == f.record["group_size"] == 2
        assert b.record["config"]["group"]["activations"] == "bf16"
        assert f.record["config"]["group"]["activations"] == "fp32"
        losses_b = [h["train_loss"] for h in b.record["history"]]
        losses_f = [h["train_loss"] for h in f.record["history"]]
        assert losses_b != losses_f and losses_b == pytest.approx(losses_f, abs=0.02)
