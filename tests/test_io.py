"""Save -> load round trips, multi-task switching on one encoder, and refusal of unsafe folders."""
from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import ALL_PRESETS, batch, model_with, randomize_

from unipelt import ModuleLoadError, PeltModel, load_task, save_task, tiny_encoder


@pytest.mark.parametrize("config", ALL_PRESETS)
def test_save_then_load_on_fresh_encoder_reproduces_logits_exactly(config, tmp_path):
    model = model_with(config)
    randomize_(model.tasks["t"])
    if config == "finetune":
        randomize_(model.encoder, std=0.01)
    ids, mask = batch()
    expected = model(ids, mask).logits
    save_task(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "weights.safetensors"]
    fresh = PeltModel(tiny_encoder(seed=0))
    load_task(fresh, tmp_path / "m")
    fresh.eval()
    assert torch.equal(fresh(ids, mask).logits, expected)


def test_folded_prefix_round_trip(tmp_path):
    model = model_with("prefix")
    randomize_(model.tasks["t"])
    model.fold_prefix()
    ids, mask = batch()
    expected = model(ids, mask).logits
    save_task(model, tmp_path / "m")
    assert json.loads((tmp_path / "m/config.json").read_text())["pelt"]["methods"]["prefix"]["folded"] is True
    fresh = PeltModel(tiny_encoder(seed=0))
    load_task(fresh, tmp_path / "m")
    fresh.eval()
    assert torch.equal(fresh(ids, mask).logits, expected)


def test_several_tasks_switch_on_one_encoder(tmp_path):
    refs, folders = {}, {}
    ids, mask = batch()
    for i, config in enumerate(["lora", "unipelt_apl", "bitfit", "prefix"]):
        model = model_with(config, num_labels=1 + i)
        randomize_(model.tasks["t"], seed=i)
        refs[config] = model(ids, mask).logits
        folders[config] = save_task(model, tmp_path / config)
    shared = PeltModel(tiny_encoder(seed=0))
    shared.eval()
    for config, folder in folders.items():
        load_task(shared, folder, name=config)
    encoder_id = id(shared.encoder)
    for config in ["prefix", "lora", "bitfit", "unipelt_apl", "lora"]:
        shared.set_active_task(config)
        assert torch.equal(shared(ids, mask).logits, refs[config]), config
    assert id(shared.encoder) == encoder_id


def test_load_refuses_pickle_files_without_unpickling(tmp_path):
    model = model_with("lora")
    folder = save_task(model, tmp_path / "m")
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (folder / "extra.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModuleLoadError, match=r"pickle file\(s\) \['extra.bin'\].*never unpickles"):
        load_task(PeltModel(tiny_encoder(seed=0)), folder)
    assert not marker.exists()


def test_load_onto_wrong_encoder_names_the_mismatch(tmp_path):
    folder = save_task(model_with("lora"), tmp_path / "m")
    other = PeltModel(tiny_encoder(hidden=48, heads=4, seed=0))
    with pytest.raises(ModuleLoadError, match=r"hidden_size: saved 32 vs encoder 48"):
        load_task(other, folder)
    assert len(other.tasks) == 0


def test_load_with_missing_tensor_fails_and_leaves_no_half_task(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_task(model_with("lora"), tmp_path / "m")
    tensors = load_file(str(folder / "weights.safetensors"))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(folder / "weights.safetensors"))
    target = PeltModel(tiny_encoder(seed=0))
    with pytest.raises(ModuleLoadError, match="missing tensors " + re.escape(f"['{dropped}'")):
        load_task(target, folder)
    assert len(target.tasks) == 0
