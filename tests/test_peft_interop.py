"""HF peft interop: a unipelt LoRA task opens in peft with the same logits, a peft LoRA comes back in, and what peft
cannot hold (gates, adapters, prefix, BitFit) or an adapter of another base model is refused with nothing written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import batch, randomize_

from unipelt import PeltConfig, PeltModel, load_encoder, preset, save_task, tiny_encoder
from unipelt.interop.peft import PeftInteropError, export_peft, import_peft

peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft; it is in the dev extra)")
from peft import LoraConfig, PeftModel, TaskType, get_peft_model  # noqa: E402
from transformers import AutoModel, AutoModelForSequenceClassification  # noqa: E402

ROOT = Path(__file__).parents[1]
TOL = 1e-5


def base_folder(tmp_path: Path, arch: str = "bert", **shape) -> Path:
    """A tiny random encoder saved as a checkpoint folder: the 'same encoder' for unipelt and for peft."""
    folder = tmp_path / f"base_{arch}_{'_'.join(f'{k}{v}' for k, v in sorted(shape.items()))}"
    if not folder.exists():
        tiny_encoder(arch, seed=3, **shape).save_pretrained(folder)
    return folder


def pelt_on(folder: Path, config, num_labels: int = 3, task: str = "t", seed: int = 11) -> PeltModel:
    model = PeltModel(load_encoder(str(folder)))
    model.add_task(task, preset(config) if isinstance(config, str) else config, num_labels)
    randomize_(model.tasks[task], seed=seed)  # B != 0 and a non-trivial head, so the test can fail
    return model.eval()


def peft_seq_cls(base: Path, export: Path, num_labels: int):
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=num_labels)
    return PeftModel.from_pretrained(model, str(export)).eval()


def ids_mask(arch: str = "bert"):
    ids, mask = batch(seed=5, b=4, t=11)
    if arch == "roberta":
        ids = ids.clamp(min=3)  # RoBERTa positions depend on the padding id (1): keep it out of real tokens
        ids[mask == 0] = 1
    return ids, mask


@pytest.mark.parametrize("arch,targets,num_labels", [
    ("bert", ["query", "value"], 3),
    ("bert", ["query", "output"], 1),  # 'output.dense' is a suffix of 'attention.output.dense': regex targets
    ("roberta", ["query", "value"], 2),
])
def test_export_opens_in_peft_with_the_same_logits(tmp_path, arch, targets, num_labels):
    base = base_folder(tmp_path, arch)
    model = pelt_on(base, PeltConfig(methods={"lora": {"r": 4, "lora_alpha": 12, "targets": targets}}), num_labels)
    ids, mask = ids_mask(arch)
    expected = model(ids, mask).logits
    out = export_peft(model, tmp_path / "export", base_model=str(base))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                      "adapter_model.safetensors", "unipelt_export.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 12
    loaded = peft_seq_cls(base, out, num_labels)
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=TOL, rtol=0), (got - expected).abs().max()
    # the LoRA and the head both matter: without the adapter, peft's base model gives other logits
    with loaded.disable_adapter(), torch.no_grad():
        assert (loaded(input_ids=ids, attention_mask=mask).logits - expected).abs().max() > 1e-3


@pytest.mark.slow
def test_export_of_the_real_minilm_matches_peft(tmp_path):
    from unipelt.encoders import resolve_model_path

    model = PeltModel(load_encoder("minilm"))
    model.add_task("sst2", preset("lora"), 2)
    randomize_(model.tasks["sst2"], std=0.05)
    model.eval()
    ids, mask = ids_mask()
    expected = model(ids, mask).logits
    out = export_peft(model, tmp_path / "export", base_model=resolve_model_path("minilm"))
    loaded = peft_seq_cls(Path(resolve_model_path("minilm")), out, 2)
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, expected, atol=TOL, rtol=0), (got - expected).abs().max()


def _peft_adapter(base: Path, folder: Path, seq_cls: bool, num_labels: int = 3, **lora) -> torch.nn.Module:
    """A LoRA trained 'in peft' (random non-zero weights), saved with peft's own save_pretrained."""
    torch.manual_seed(0)
    if seq_cls:
        model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=num_labels)
        cfg = LoraConfig(task_type=TaskType.SEQ_CLS, **{"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
                                                        **lora})
    else:
        model = AutoModel.from_pretrained(str(base))
        cfg = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], **lora})
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    pm.eval()
    pm.save_pretrained(str(folder))
    return pm


@pytest.mark.parametrize("modules_to_save", [["pooler"], None])
def test_import_of_a_peft_classifier_matches_its_logits(tmp_path, modules_to_save):
    base = base_folder(tmp_path)
    pm = _peft_adapter(base, tmp_path / "adapter", seq_cls=True, modules_to_save=modules_to_save)
    ids, mask = ids_mask()
    with torch.no_grad():
        expected = pm(input_ids=ids, attention_mask=mask).logits
    model = PeltModel(load_encoder(str(base)))
    name = import_peft(model, tmp_path / "adapter", task="imported")
    model.eval()
    assert name == "imported" and model.active_task == "imported"
    lora = model.tasks["imported"].config.methods["lora"]
    assert (lora.r, lora.lora_alpha, lora.targets, lora.gate) == (4, 8.0, ["query", "value"], False)
    got = model(ids, mask).logits
    assert torch.allclose(got, expected, atol=TOL, rtol=0), (got - expected).abs().max()


def test_import_of_a_bare_encoder_adapter_matches_hidden_states_and_needs_num_labels(tmp_path):
    base = base_folder(tmp_path)
    pm = _peft_adapter(base, tmp_path / "adapter", seq_cls=False, target_modules=["query", "value", "intermediate.dense"])
    ids, mask = ids_mask()
    with torch.no_grad():
        expected = pm(input_ids=ids, attention_mask=mask).last_hidden_state
    model = PeltModel(load_encoder(str(base)))
    with pytest.raises(PeftInteropError, match="num_labels"):
        import_peft(model, tmp_path / "adapter")
    assert len(model.tasks) == 0
    import_peft(model, tmp_path / "adapter", num_labels=2)
    model.eval()
    assert model.tasks["peft"].config.methods["lora"].targets == ["query", "value", "intermediate"]
    seen = {}
    model.active.head.register_forward_hook(lambda mod, args, out: seen.update(hidden=args[0]))
    model(ids, mask)
    assert torch.allclose(seen["hidden"], expected, atol=TOL, rtol=0), (seen["hidden"] - expected).abs().max()


def test_export_then_import_round_trips_exactly(tmp_path):
    base = base_folder(tmp_path)
    model = pelt_on(base, "lora", num_labels=2)
    ids, mask = ids_mask()
    expected = model(ids, mask).logits
    export_peft(model, tmp_path / "export")
    fresh = PeltModel(load_encoder(str(base)))
    import_peft(fresh, tmp_path / "export", task="back")
    fresh.eval()
    assert torch.equal(fresh(ids, mask).logits, expected)
    assert fresh.tasks["back"].config.to_dict() == model.tasks["t"].config.to_dict()


@pytest.mark.parametrize("config,lost", [
    ("unipelt_apl", ["bottleneck adapters", "prefix", "LoRA gates (lora_query, lora_value"]),
    ("unipelt_l", ["LoRA gates", "fixed lora_alpha/r = 2"]),
    ("adapter", ["bottleneck adapters"]),
    ("prefix", ["prefix keys/values"]),
    ("bitfit", ["BitFit bias deltas"]),
    ("headonly", ["has no LoRA"]),
])
def test_export_refuses_what_peft_cannot_hold_and_writes_nothing(tmp_path, config, lost):
    model = pelt_on(base_folder(tmp_path), config)
    with pytest.raises(PeftInteropError) as err:
        export_peft(model, tmp_path / "export")
    for words in lost:
        assert words in str(err.value)
    assert not (tmp_path / "export").exists()


def test_import_refuses_an_adapter_of_another_base_model(tmp_path):
    small = base_folder(tmp_path)  # hidden 32, 2 layers
    _peft_adapter(small, tmp_path / "adapter", seq_cls=True)
    wider = PeltModel(load_encoder(str(base_folder(tmp_path, hidden=48, heads=4))))
    with pytest.raises(PeftInteropError, match=r"another base model.*hidden_size: adapter 32 vs encoder 48"):
        import_peft(wider, tmp_path / "adapter")
    deeper = PeltModel(load_encoder(str(base_folder(tmp_path, layers=3))))
    with pytest.raises(PeftInteropError, match=r"num_layers: adapter 2 vs encoder 3"):
        import_peft(deeper, tmp_path / "adapter")
    roberta = PeltModel(load_encoder(str(base_folder(tmp_path, "roberta"))))
    with pytest.raises(PeftInteropError, match=r"model_type: adapter 'bert' vs encoder 'roberta'"):
        import_peft(roberta, tmp_path / "adapter")
    for model in (wider, deeper, roberta):
        assert len(model.tasks) == 0
    # without a readable base model path, the weights themselves give it away
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/unknown-model"
    (tmp_path / "adapter/adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PeftInteropError, match=r"weights name a 'bert' encoder .* but the encoder is a 'roberta'"):
        import_peft(roberta, tmp_path / "adapter")
    with pytest.raises(PeftInteropError, match=r"lora_A \(4, 32\).*needs \(4, 48\)"):
        import_peft(wider, tmp_path / "adapter")


def test_import_refuses_what_unipelt_cannot_hold(tmp_path):
    base = base_folder(tmp_path)
    _peft_adapter(base, tmp_path / "dora", seq_cls=False, use_dora=True)
    model = PeltModel(load_encoder(str(base)))
    with pytest.raises(PeftInteropError, match="DoRA"):
        import_peft(model, tmp_path / "dora", num_labels=2)
    _peft_adapter(base, tmp_path / "partial", seq_cls=False, layers_to_transform=[1])
    with pytest.raises(PeftInteropError, match=r"adapts query in some layers only \(missing: \[0\]\)"):
        import_peft(model, tmp_path / "partial", num_labels=2)
    _peft_adapter(base, tmp_path / "ffn", seq_cls=False, target_modules=["dense"])  # also hits pooler.dense
    with pytest.raises(PeftInteropError, match="cannot attach.*pooler.dense"):
        import_peft(model, tmp_path / "ffn", num_labels=2)
    assert len(model.tasks) == 0


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "unipelt.run", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli_export_import_and_refusals(tmp_path):
    base = base_folder(tmp_path)
    model = pelt_on(base, "lora", num_labels=2)
    save_task(model, tmp_path / "run/modules")
    (tmp_path / "run/record.json").write_text(json.dumps({"config": {"model": {"path": str(base)}}}))
    gated = pelt_on(base, "unipelt_apl", num_labels=2)
    save_task(gated, tmp_path / "gated")
    script = (
        "import sys; from unipelt.interop.cli import main; codes = [main(a.split('|')) for a in sys.argv[1:]]; "
        "print(codes)")
    calls = [f"export-peft|{tmp_path}/run/modules|{tmp_path}/exp",
             f"import-peft|{tmp_path}/exp|{tmp_path}/back|--task|back",
             f"export-peft|{tmp_path}/gated|{tmp_path}/bad_exp",
             f"import-peft|{tmp_path}/exp|{tmp_path}/bad_imp|--model|{base_folder(tmp_path, layers=3)}"]
    out = subprocess.run([sys.executable, "-c", script, *calls], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[0, 0, 2, 2]", out.stderr
    assert "unipelt export-peft: error: cannot export task 't'" in out.stderr and "bottleneck adapters" in out.stderr
    assert "unipelt import-peft: error:" in out.stderr and "num_layers: adapter 2 vs encoder 3" in out.stderr
    assert not (tmp_path / "bad_exp").exists() and not (tmp_path / "bad_imp").exists()
    assert json.loads((tmp_path / "exp/adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    back = PeltModel(load_encoder(str(base)))
    from unipelt import load_task

    load_task(back, tmp_path / "back")
    back.eval()
    ids, mask = ids_mask()
    assert torch.equal(back(ids, mask).logits, model(ids, mask).logits)
    # the `unipelt` entry point itself dispatches the subcommand before Hydra sees argv
    res = _cli("export-peft", tmp_path / "gated", tmp_path / "bad_exp2")
    assert res.returncode == 2 and "unipelt export-peft: error:" in res.stderr, res.stderr
    assert not (tmp_path / "bad_exp2").exists()
