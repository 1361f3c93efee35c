"""Numerical properties of each method and of their gated combination (tiny random encoders)."""
from __future__ import annotations

import pytest
import torch
from helpers import ALL_PRESETS, batch, copy_matching_, model_with, randomize_

from unipelt import PeltConfig, PeltModel, preset, tiny_encoder
from unipelt.methods.adapter import AdapterConfig


def head_only_twin(model: PeltModel) -> PeltModel:
    """The plain frozen encoder with the same head: the reference for identity at init."""
    twin = model_with("headonly")
    copy_matching_(twin.tasks["t"].head, model.tasks["t"].head)
    return twin


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("config", ["adapter", "houlsby", "lora", "bitfit", "unipelt_al", "unipelt_alb", "unipelt_alb_nogate"])
def test_identity_at_init_is_exact(config, arch):
    # Adapters start with up=0, LoRA with B=0, BitFit with zero deltas: each adds exact zeros, so the
    # tolerance is 0 (bit-identical), not "close".
    model = model_with(config, arch=arch)
    twin = PeltModel(tiny_encoder(arch, seed=0))
    twin.add_task("t", preset("headonly"), 2)
    twin.eval()
    copy_matching_(twin.tasks["t"].head, model.tasks["t"].head)
    ids, mask = batch()
    assert torch.equal(model(ids, mask).logits, twin(ids, mask).logits)


def test_non_prefix_modules_add_nothing_on_top_of_prefix_at_init():
    # Prefix-tuning changes outputs by design; A, L and B are still exact identities on top of it.
    full = model_with(PeltConfig(methods={"adapter": {"placement": "houlsby"}, "prefix": {}, "lora": {}, "bitfit": {}}))
    only_prefix = model_with("prefix")
    copy_matching_(only_prefix.tasks["t"], full.tasks["t"])
    ids, mask = batch()
    assert torch.equal(full(ids, mask).logits, only_prefix(ids, mask).logits)


@pytest.mark.parametrize("config", ALL_PRESETS)
def test_only_intended_parameters_train_and_encoder_stays_bit_identical(config):
    model = model_with(config)
    model.train()
    frozen_before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    trainable = model.trainable_named_parameters()
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids, mask = batch()
    labels = torch.tensor([0, 1, 1, 0])
    for _ in range(3):
        opt.zero_grad()
        model(ids, mask, labels=labels).loss.backward()
        opt.step()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable_names(model))
    changed = [n for n, p in model.encoder.named_parameters() if not torch.equal(p, frozen_before[n])]
    if config == "finetune":
        assert len(changed) > 0
    else:
        assert changed == []
        assert all(n.startswith("tasks.t.") for n in trainable)


def trainable_names(model):
    ids_by_param = {id(p): n for n, p in model.named_parameters()}
    return [ids_by_param[id(p)] for p in model.trainable_named_parameters().values()]


@pytest.mark.parametrize("single", ["adapter", "houlsby", "prefix", "lora", "bitfit"])
def test_combination_with_others_removed_and_gate_fixed_equals_single_method(single):
    method = "adapter" if single == "houlsby" else single
    combo = preset("unipelt_aplb_nogate")
    kept = {method: combo.methods[method]}
    if single == "houlsby":
        kept = {"adapter": AdapterConfig(placement="houlsby")}
    combined = model_with(PeltConfig(methods=kept))
    alone = model_with(single)
    randomize_(alone.tasks["t"])
    assert copy_matching_(combined.tasks["t"], alone.tasks["t"]) == len(list(alone.tasks["t"].parameters()))
    ids, mask = batch()
    assert torch.equal(combined(ids, mask).logits, alone(ids, mask).logits)


def test_gated_lora_inside_combination_equals_gated_lora_alone_when_adapter_is_identity():
    combined = model_with("unipelt_al")
    alone = model_with(PeltConfig(methods={"lora": {"gate": True}}))
    randomize_(alone.tasks["t"])
    copy_matching_(combined.tasks["t"], alone.tasks["t"])  # adapter keeps up=0: an exact identity
    ids, mask = batch()
    assert torch.equal(combined(ids, mask).logits, alone(ids, mask).logits)


def layer0_query(model):
    return model.encoder.encoder.layer[0].attention.self.query


def test_lora_matches_hand_computed_update():
    model = model_with("lora")
    randomize_(model.tasks["t"])
    lora = model.tasks["t"].methods["lora"]
    update = lora.updates["query"][0]
    site = layer0_query(model)
    x = torch.randn(2, 5, 32)
    W, b = site.base.weight, site.base.bias
    expected = x @ W.T + b + (16 / 8) * (x @ update.A.T @ update.B.T)
    model.state.active = "t"
    assert torch.allclose(site(x), expected, atol=1e-6)


def test_gated_lora_gate_replaces_scaling_by_hand():
    for mode, factor in (("replace", 1.0), ("multiply", 2.0)):
        model = model_with(PeltConfig(methods={"lora": {"gate": True, "gate_mode": mode}}))
        randomize_(model.tasks["t"])
        lora = model.tasks["t"].methods["lora"]
        update, gate = lora.updates["query"][0], lora.gate_modules["query"][0]
        site = layer0_query(model)
        x = torch.randn(2, 5, 32)
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float)
        model.state.active, model.state.mask = "t", mask
        model.state.layer_inputs = {0: x}
        per_token = torch.sigmoid(x @ gate.proj.weight.T + gate.proj.bias).squeeze(-1)
        g = (per_token * mask).sum(1) / mask.sum(1)
        expected = x @ site.base.weight.T + site.base.bias + factor * g[:, None, None] * (x @ update.A.T @ update.B.T)
        assert torch.allclose(site(x), expected, atol=1e-6), mode


def test_prefix_attention_matches_an_independent_eager_computation():
    model = model_with("unipelt_p", layers=1)
    randomize_(model.tasks["t"])
    ids, mask = batch(b=3, t=6)
    logits = model(ids, mask).logits
    enc = model.encoder
    layer = enc.encoder.layer[0]
    attn = layer.attention.self.base
    x = enc.embeddings(input_ids=ids)
    prefix = model.tasks["t"].methods["prefix"]
    kv = prefix.prefix_states()[0]  # (2, P, h)
    gate = prefix.gate_modules[0]
    m = mask.float()
    g = (torch.sigmoid(gate.proj(x)).squeeze(-1) * m).sum(1) / m.sum(1)
    heads, d = 4, 8

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

    q, k, v = split(attn.query(x)), split(attn.key(x)), split(attn.value(x))
    pk = split(kv[0].expand(3, -1, -1)) * g[:, None, None, None]
    pv = split(kv[1].expand(3, -1, -1)) * g[:, None, None, None]
    k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    scores = q @ k.transpose(-1, -2) / d**0.5
    keep = torch.cat([torch.ones(3, pk.shape[2]), m], 1)[:, None, None, :]
    scores = scores.masked_fill(keep == 0, float("-inf"))
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(3, 6, heads * d)
    h = layer.attention.output(ctx, x)
    h = layer.output(layer.intermediate(h), h)
    expected = model.tasks["t"].head(h)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_prefix_padding_is_masked_out():
    model = model_with("prefix")
    randomize_(model.tasks["t"])
    ids, _ = batch(b=1, t=6, pad_rows=0)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    a = model(ids, torch.ones_like(ids)).logits
    b = model(padded, mask).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_prefix_fold_keeps_outputs_and_shrinks_parameters():
    model = model_with("unipelt_p")
    randomize_(model.tasks["t"])
    ids, mask = batch()
    before = model(ids, mask).logits
    counts = model.parameter_counts()
    model.train()
    with pytest.raises(RuntimeError, match="while training"):
        model.fold_prefix()
    model.eval()
    model.fold_prefix()
    after = model(ids, mask).logits
    assert torch.allclose(before, after, atol=1e-6)
    folded = model.parameter_counts()
    assert folded["modules"] < counts["modules"]
    assert counts["prefix_folded_params"] == 2 * 2 * 10 * 32  # layers * (k, v) * length * hidden
    assert folded["modules"] == counts["prefix_folded_params"] + (counts["modules"] - counts["prefix_training_params"])


@pytest.mark.parametrize("config", ["unipelt_apl", "unipelt_aplb"])
def test_gates_are_in_unit_interval_depend_on_input_and_get_gradients(config):
    model = model_with(config)
    randomize_(model.tasks["t"], std=0.5)
    model.train()
    ids, mask = batch(seed=1)
    out = model(ids, mask, labels=torch.tensor([0, 1, 0, 1]))
    values = model.gate_values()
    assert set(values) >= {"adapter_ffn", "prefix", "lora_query", "lora_value"}
    first = {k: torch.stack(v) for k, v in values.items()}
    for name, v in first.items():
        assert v.shape == (2, 4), name  # layers x batch
        assert ((v > 0) & (v < 1)).all(), name
        assert v.std() > 0, f"{name}: gate does not vary across examples"
    out.loss.backward()
    for method in model.tasks["t"].methods.values():
        for name, gates in method.gates().items():
            for gate in gates:
                assert gate.proj.weight.grad is not None and gate.proj.weight.grad.abs().sum() > 0, name
    model(*batch(seed=2))
    second = {k: torch.stack(v) for k, v in model.gate_values().items()}
    assert any(not torch.allclose(first[k], second[k]) for k in first)


def test_gates_start_near_one_half():
    model = model_with("unipelt_apl")
    model(*batch())
    for name, per_layer in model.gate_values().items():
        assert torch.allclose(torch.stack(per_layer), torch.full((2, 4), 0.5), atol=0.05), name


@pytest.mark.parametrize("pooling,invariant", [("masked", True), ("all", False)])
def test_gate_pooling_over_padding(pooling, invariant):
    config = preset("unipelt_l", gate_pooling=pooling)
    model = model_with(config)
    randomize_(model.tasks["t"], std=0.5)
    ids, _ = batch(b=1, t=6, pad_rows=0)
    model(ids, torch.ones_like(ids))
    short = model.gate_values()["lora_query"][0].clone()
    model(torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1), torch.tensor([[1] * 6 + [0] * 4]))
    padded = model.gate_values()["lora_query"][0]
    assert torch.allclose(short, padded, atol=1e-6) == invariant


def test_parameter_counts_add_up():
    model = model_with("unipelt_apl")
    counts = model.parameter_counts()
    assert counts["trainable"] == sum(p.numel() for p in model.tasks["t"].parameters())
    assert counts["encoder"] == sum(p.numel() for p in model.encoder.parameters())
    assert counts["percent"] == pytest.approx(100 * counts["trainable"] / counts["encoder"])
    lora = model.tasks["t"].methods["lora"]
    assert sum(p.numel() for p in lora.updates.parameters()) == 2 * 2 * 8 * (32 + 32)  # layers*targets*r*(in+out)


def test_regression_head_uses_mse():
    model = model_with("lora", num_labels=1)
    ids, mask = batch()
    labels = torch.tensor([0.5, 1.0, 4.0, 2.5])
    out = model(ids, mask, labels=labels)
    assert out.logits.shape == (4, 1)
    assert torch.allclose(out.loss, ((out.logits.squeeze(-1) - labels) ** 2).mean())


def test_unknown_architecture_and_method_errors_name_the_choices():
    from transformers import AutoConfig, AutoModel

    gpt = AutoModel.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"'gpt2'.*supported: bert, mpnet, roberta"):
        PeltModel(gpt)
    with pytest.raises(ValueError, match=r"'lorax'.*adapter.*bitfit.*lora.*prefix"):
        PeltConfig(methods={"lorax": {}})
    with pytest.raises(ValueError, match=r"unipelt_xyz"):
        preset("unipelt_xyz")
    with pytest.raises(ValueError, match=r"unknown option.*'rank'.*allowed"):
        PeltConfig(methods={"lora": {"rank": 4}})
    with pytest.raises(ValueError, match=r"placement 'middle'"):
        PeltConfig(methods={"adapter": {"placement": "middle"}})


@pytest.mark.parametrize("config", ALL_PRESETS)
def test_short_training_on_a_separable_toy_task_drives_loss_down(config):
    # label = whether token 7 occurs in the sequence
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, 100, (32, 8), generator=g)
    labels = torch.arange(32) % 2
    ids[labels == 1, 3] = 7
    mask = torch.ones_like(ids)
    model = model_with(config)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(ids, mask, labels=labels).loss.item()

    start = eval_loss()
    lr = 1e-3 if config == "finetune" else 1e-2
    opt = torch.optim.AdamW(model.trainable_named_parameters().values(), lr=lr)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        model(ids, mask, labels=labels).loss.backward()
        opt.step()
    end = eval_loss()
    assert end < 0.5 * start, (start, end)


def test_deep_copy_is_refused_with_a_remedy_instead_of_sharing_forward_state():
    import copy

    model = model_with("unipelt_apl")
    with pytest.raises(TypeError, match="cannot be deep-copied.*save_task/load_task"):
        copy.deepcopy(model)
