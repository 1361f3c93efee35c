"""A few properties on the real pretrained MiniLM (2 of its 6 layers, to stay fast)."""
from __future__ import annotations

import pytest
import torch

from unipelt import PeltModel, load_encoder, load_task, load_tokenizer, preset, save_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs():
    tok = load_tokenizer("minilm")
    enc = tok(["a gripping, funny film", "the plot never comes together and the jokes fall flat"],
              padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def minilm(config):
    model = PeltModel(load_encoder("minilm", num_layers=2))
    torch.manual_seed(0)
    model.add_task("t", preset(config), 2)
    return model.eval()


def test_identity_at_init_on_minilm(inputs):
    plain = minilm("headonly")
    wrapped = minilm("unipelt_alb")
    wrapped.tasks["t"].head.load_state_dict(plain.tasks["t"].head.state_dict())
    assert torch.equal(plain(*inputs).logits, wrapped(*inputs).logits)


def test_head_starts_from_the_pretrained_pooler():
    model = minilm("lora")
    from safetensors import safe_open

    from unipelt.encoders import resolve_model_path

    with safe_open(f"{resolve_model_path('minilm')}/model.safetensors", "pt") as f:
        pooler = f.get_tensor("pooler.dense.weight")
    assert torch.equal(model.tasks["t"].head.dense.weight, pooler)


def test_save_load_round_trip_on_minilm(inputs, tmp_path):
    model = minilm("unipelt_apl")
    with torch.no_grad():
        for p in model.tasks["t"].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    expected = model(*inputs).logits
    save_task(model, tmp_path / "m")
    fresh = PeltModel(load_encoder("minilm", num_layers=2)).eval()
    load_task(fresh, tmp_path / "m")
    assert torch.equal(fresh(*inputs).logits, expected)
    counts = fresh.parameter_counts()
    assert 0 < counts["percent"] < 10
