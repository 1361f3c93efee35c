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


# --- the training loop's train.cuda_graph switch -------------------------------------------------------------------
TINY = ["model.num_layers=1", "data.k=8", "data.dev_size=16", "data.max_length=32", "train.epochs=2",
        "output.progress=false"]


def _config(*overrides: str):
    from hydra import compose, initialize_config_dir

    from unipelt.confdir import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _record(run_dir) -> dict:
    import json

    return json.loads((run_dir / "record.json").read_text())


def test_cli_run_with_cuda_graph_trains_like_the_plain_run_and_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    """train.cuda_graph=true (here: the static-buffer step, batches padded to data.max_length) gives the scores,
    losses and weights of the plain loop on batches padded alike; a run that fails while checkpointing epoch 3
    resumes to the same result. (Padded alike: the dropout masks are drawn over the padded shape, so a plain run
    with per-batch padding draws other masks and trains differently, though as well.)"""
    from safetensors.torch import load_file

    import unipelt.training.checkpoint as ckpt
    import unipelt.training.trainer as trainer_module
    from unipelt.run import run_cli
    from unipelt.training.batching import batches

    widths, rows, asked = [], [], []
    force_pad_to = 80  # for the plain run

    class Spy(GraphedTrainStep):
        def __call__(self, batch):
            widths.append(batch["input_ids"].shape[1])
            rows.append(batch["input_ids"].shape[0])
            return super().__call__(batch)

    def spy_batches(*args, pad_to=None, **kwargs):
        asked.append(pad_to)
        yield from batches(*args, pad_to=pad_to or force_pad_to, **kwargs)

    monkeypatch.setattr(trainer_module, "GraphedTrainStep", Spy)
    monkeypatch.setattr(trainer_module, "batches", spy_batches)
    base = [*TINY, "method=unipelt_apl", "data.max_length=80", "train.batch_size=5", "train.epochs=3",
            "train.patience=100", "group.enabled=false"]  # the per-run trainer for both (graphs are per run)
    rid = "rte-unipelt_apl-k8-d111-s42"
    plain, graphed, resumed = (tmp_path / name for name in ("plain", "graphed", "resumed"))
    run_cli(_config(*base, f"output.runs_dir={plain}"))
    assert widths == []  # the plain run does not use the graphed step
    assert set(asked) == {None}  # and pads each batch to its longest row (here forced to 80, for comparison)
    asked.clear()
    force_pad_to = None
    run_cli(_config(*base, "train.cuda_graph=true", f"output.runs_dir={graphed}"))
    rp, rg = _record(plain / rid), _record(graphed / rid)
    assert rg["config"]["train"]["cuda_graph"] is True and rg["steps"] == rp["steps"] == len(widths)
    assert set(asked) == {80} and set(widths) == {80}, "every training batch is padded to data.max_length"
    assert 5 in rows and min(rows) < 5, "full batches and the short last batch (which runs eagerly) both occur"
    assert rg["dev_score"] == pytest.approx(rp["dev_score"], abs=1e-4)
    assert rg["test_score"] == pytest.approx(rp["test_score"], abs=1e-4)
    for key in ("train_loss", "dev_score", "lr"):
        assert [r[key] for r in rg["history"]] == pytest.approx([r[key] for r in rp["history"]], abs=1e-4), key
    assert all(isinstance(r["lr"], float) for r in rg["history"])
    wp = load_file(str(plain / rid / "modules" / "weights.safetensors"))
    wg = load_file(str(graphed / rid / "modules" / "weights.safetensors"))
    assert wp.keys() == wg.keys() and all(torch.allclose(wp[k], wg[k], atol=1e-5) for k in wp)

    # Interrupted while checkpointing epoch 3 (the tensor LR went through state.json as a float), then resumed.
    real_save = ckpt.save_tensors

    def disk_full_at_epoch_3(path, tensors):
        if path.name == "optimizer-e3.safetensors":
            raise OSError(28, "No space left on device")
        real_save(path, tensors)

    monkeypatch.setattr(ckpt, "save_tensors", disk_full_at_epoch_3)
    with pytest.raises(SystemExit):
        run_cli(_config(*base, "train.cuda_graph=true", f"output.runs_dir={resumed}"))
    monkeypatch.setattr(ckpt, "save_tensors", real_save)
    run_cli(_config(*base, "train.cuda_graph=true", f"output.runs_dir={resumed}"))
    rr = _record(resumed / rid)
    assert rr["status"] == "complete" and rr["resumed_from_epoch"] == 2
    for key in ("test_score", "dev_score", "metrics", "steps"):
        assert rr[key] == rg[key], key
    untimed = [{k: v for k, v in r.items() if k != "epoch_s"} for r in rr["history"]]
    assert untimed == [{k: v for k, v in r.items() if k != "epoch_s"} for r in rg["history"]]
    wr = load_file(str(resumed / rid / "modules" / "weights.safetensors"))
    assert all(torch.equal(wr[k], wg[k]) for k in wg)


@pytest.mark.parametrize("overrides, words", [
    ({"mixed_precision": "fp16"}, ["train.cuda_graph", "train.mixed_precision=fp16", "GradScaler",
                                   "use train.mixed_precision=bf16 or no"]),
    ({"inject_nan_at_step": 3}, ["train.cuda_graph", "train.inject_nan_at_step=3", "inject_nan_at_step=null"]),
    ({"compile": "cudagraphs"}, ["train.cuda_graph=true", "train.compile='cudagraphs'", "inside another",
                                 "train.compile=true"]),
])
def test_cuda_graph_refuses_settings_it_cannot_honour(overrides, words):
    from unipelt.training.trainer import TrainSettings

    with pytest.raises(ValueError) as err:
        TrainSettings(cuda_graph=True, **overrides)
    for word in words:
        assert word in str(err.value)
    TrainSettings(cuda_graph=False, **overrides)  # each is fine without the graph
    TrainSettings(cuda_graph=True, mixed_precision="bf16")
    TrainSettings(cuda_graph=True, compile=True)  # inductor's fused kernels, captured whole: allowed


def test_cuda_graph_must_be_a_bool_or_auto_and_the_config_defaults_to_auto():
    from unipelt.training.trainer import TrainSettings

    with pytest.raises(ValueError, match=r"train.cuda_graph must be true, false or auto, got 'yes'"):
        TrainSettings(cuda_graph="yes")
    assert TrainSettings().cuda_graph is False
    assert _config().train.cuda_graph == "auto"
    with pytest.raises(ValueError, match=r"train.graph_bucket=16 .* needs train.cuda_graph=true or auto"):
        TrainSettings(cuda_graph=False, graph_bucket=16)
    TrainSettings(cuda_graph="auto", graph_bucket=32, mixed_precision="fp16")  # auto just resolves to off there


def test_auto_graphs_resolve_on_only_where_the_per_run_trainer_can_capture_them():
    from unipelt.training.trainer import TrainSettings

    auto = TrainSettings(cuda_graph="auto")
    on = auto.resolve_auto_graph(True)
    assert (on.cuda_graph, on.graph_bucket) == (True, 16)
    assert auto.resolve_auto_graph(False).cuda_graph is False and auto.resolve_auto_graph(False).graph_bucket is None
    assert TrainSettings(cuda_graph="auto", graph_bucket=32).resolve_auto_graph(True).graph_bucket == 32
    for ruled_out in ({"mixed_precision": "fp16"}, {"inject_nan_at_step": 3}, {"compile": "cudagraphs"}):
        assert TrainSettings(cuda_graph="auto", **ruled_out).resolve_auto_graph(True).cuda_graph is False, ruled_out
    explicit = TrainSettings(cuda_graph=True)
    assert explicit.resolve_auto_graph(False) is explicit  # true and false are never second-guessed


def test_a_plan_resolves_auto_graphs_per_run_and_its_config_says_so(monkeypatch, tmp_path):
    """On a CUDA host the runs of the per-run trainer (full fine-tuning, group.enabled=false) get graphs with 16-token
    buckets; PEFT runs of the grouped engine and runs on a CPU host do not; the plan's config (what the record and
    the skip/resume checks see) holds the resolved values."""
    import unipelt.plan as plan_module
    from unipelt.training.record import config_diff

    base = [*TINY, f"output.runs_dir={tmp_path}"]

    def resolved(*overrides):
        p = plan_module.plan(_config(*base, *overrides))
        assert p.config["train"]["cuda_graph"] is p.settings.cuda_graph
        assert p.config["train"].get("graph_bucket") == p.settings.graph_bucket
        return p.settings.cuda_graph, p.settings.graph_bucket

    cpu_finetune = plan_module.plan(_config(*base, "method=finetune"))
    assert resolved("method=finetune") == (False, None)  # this CPU host
    monkeypatch.setattr(plan_module.torch.cuda, "is_available", lambda: True)
    assert resolved("method=finetune") == (True, 16)
    assert resolved("method=lora", "group.enabled=false") == (True, 16)
    assert resolved("method=lora") == (False, None)  # the grouped engine
    assert resolved("method=finetune", "train.mixed_precision=fp16") == (False, None)
    assert resolved("method=finetune", "train.cuda_graph=false") == (False, None)
    assert resolved("method=finetune", "+train.graph_bucket=32") == (True, 32)
    gpu_finetune = plan_module.plan(_config(*base, "method=finetune"))
    assert config_diff(cpu_finetune.config, gpu_finetune.config) == [
        "train.cuda_graph: False -> True", "train.graph_bucket: None -> 16"]
    monkeypatch.setenv("WORLD_SIZE", "2")  # accelerate launch: DDP's all-reduce is not captured
    assert resolved("method=finetune") == (False, None)
    # a record written before train.cuda_graph / train.compile existed counts as ungraphed, uncompiled
    old = {k: v for k, v in cpu_finetune.config["train"].items() if k not in ("cuda_graph", "compile", "graph_bucket")}
    assert config_diff({**cpu_finetune.config, "train": old}, cpu_finetune.config) == []


def test_cuda_graph_with_several_processes_fails_at_fit(tmp_path):
    from types import SimpleNamespace

    from unipelt.training.trainer import Trainer, TrainSettings

    acc = SimpleNamespace(num_processes=2, process_index=0, device=torch.device("cpu"), is_main_process=True)
    trainer = Trainer(model_with("lora"), None, None, None, TrainSettings(cuda_graph=True), 0, tmp_path, acc,
                      progress=False)
    with pytest.raises(ValueError, match=r"train.cuda_graph=true supports one process only, got 2"):
        trainer.fit()


def test_batches_pad_to_a_fixed_width_with_the_same_rows():
    from unipelt.training.batching import Encoded, batches, epoch_order

    lengths = [3, 7, 5, 2, 9, 4, 6]
    data = Encoded([list(range(1, n + 1)) for n in lengths], [[1] * n for n in lengths],
                   torch.arange(len(lengths)))
    order = epoch_order(len(lengths), seed=1, epoch=1)
    plain = list(batches(data, order, 3, 0))
    fixed = list(batches(data, order, 3, 0, pad_to=12))
    assert [b["input_ids"].shape for b in fixed] == [(3, 12), (3, 12), (1, 12)]
    assert max(b["input_ids"].shape[1] for b in plain) < 12
    for p, f in zip(plain, fixed):
        w = p["input_ids"].shape[1]
        assert torch.equal(f["labels"], p["labels"])
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert torch.equal(f[key][:, :w], p[key][:, :w]), key
            assert f[key][:, w:].eq(0).all(), key  # pad id 0, mask 0, type 0
    # a row longer than pad_to keeps its length (the width is max(pad_to, longest row))
    assert next(batches(data, [4], 1, 0, pad_to=6))["input_ids"].shape == (1, 9)


def test_checkpoint_round_trip_keeps_a_tensor_lr_the_same_tensor_with_the_saved_value(tmp_path):
    import json

    from transformers import get_linear_schedule_with_warmup

    from unipelt.training.checkpoint import Checkpointer, load_optimizer_state

    def make():
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(4))
        opt = capturable_adamw([param], 1e-2, weight_decay=0.1)
        return param, opt, get_linear_schedule_with_warmup(opt, 2, 10)

    def train(param, opt, sched, n):
        for _ in range(n):
            opt.zero_grad()
            (param ** 2).sum().backward()
            opt.step()
            sched.step()

    param, opt, sched = make()
    train(param, opt, sched, 3)
    saved_lr = opt.param_groups[0]["lr"].item()
    assert saved_lr not in (0.0, 1e-2)  # mid-schedule
    ckpt = Checkpointer(tmp_path / "checkpoint")
    ckpt.save(1, {"p": param.detach()}, None, opt, sched, {"best_epoch": 1})
    state = ckpt.load()
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["optimizer"]["param_groups"][0]["lr"] \
        == pytest.approx(saved_lr)

    param2, opt2, sched2 = make()
    lr_tensor = opt2.param_groups[0]["lr"]
    with torch.no_grad():
        param2.copy_(state["trainable"]["p"])
    load_optimizer_state(opt2, sched2, state["optimizer_state"], state["scheduler"])
    group = opt2.param_groups[0]
    assert group["lr"] is lr_tensor, "the very tensor a captured graph reads"
    assert group["lr"].item() == saved_lr and group["lr"].dtype == torch.float64
    assert torch.is_tensor(sched2.base_lrs[0]) and torch.is_tensor(sched2.get_last_lr()[0])
    # both continue identically, and the scheduler keeps filling the same tensor
    train(param, opt, sched, 3)
    train(param2, opt2, sched2, 3)
    assert opt2.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == opt.param_groups[0]["lr"].item()
    assert torch.equal(param, param2)


# --- length buckets: a few widths, one graph each -------------------------------------------------------------
def test_bucket_width_is_the_next_multiple_capped_at_the_max_length_and_never_shorter_than_the_row():
    from unipelt.training.cuda_graph import bucket_width

    assert [bucket_width(n, 16, 128) for n in (1, 16, 17, 100, 112, 113, 128)] == [16, 16, 32, 112, 112, 128, 128]
    assert bucket_width(50, 32, 40) == 50  # a row longer than the cap keeps its length
    with pytest.raises(ValueError, match="positive integer, got 0"):
        bucket_width(5, 0, 128)


def test_batches_pad_each_batch_to_its_bucket_with_the_same_rows():
    from unipelt.training.batching import Encoded, batches, epoch_order

    lengths = [3, 7, 5, 2, 19, 4, 6, 12, 30]
    data = Encoded([list(range(1, n + 1)) for n in lengths], None, torch.arange(len(lengths)))
    order = epoch_order(len(lengths), seed=1, epoch=1)
    plain = list(batches(data, order, 3, 0))
    bucketed = list(batches(data, order, 3, 0, pad_to=30, pad_multiple=8))
    for p, b in zip(plain, bucketed):
        longest = p["input_ids"].shape[1]
        assert b["input_ids"].shape[1] == min(30, -(-longest // 8) * 8)
        assert torch.equal(b["input_ids"][:, :longest], p["input_ids"]) and b["input_ids"][:, longest:].eq(0).all()
        assert torch.equal(b["labels"], p["labels"])


def _bucketed_batches(widths):
    """The toy batches padded to the given widths (length buckets)."""
    out = []
    for w in widths:
        b = _batches(1, short_every=99)[0]
        ids = torch.zeros((b["input_ids"].shape[0], w), dtype=torch.long)
        n = min(w, b["input_ids"].shape[1])
        ids[:, :n] = b["input_ids"][:, :n]
        mask = (ids != 0).long()
        mask[:, 0] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": b["labels"]})
    return out


def _train_bucketed(model, batches, device, max_shapes):
    opt = capturable_adamw(list(model.trainable_named_parameters().values()), 1e-2, device=device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    step = GraphedTrainStep(lambda b: model(**b).loss, opt, device, warmup=2, max_shapes=max_shapes)
    torch.manual_seed(3)
    losses = []
    for batch in batches:
        losses.append(step({k: v.to(device) for k, v in batch.items()}).item())
        sched.step()
    return losses, step


WIDTHS = [16, 32, 16, 48, 32, 16, 48, 32, 16, 32, 16, 32]  # three bucket widths; graphs for the first two


def test_graphed_step_keeps_one_set_of_buffers_per_shape_up_to_its_limit_and_trains_like_the_plain_loop():
    device = torch.device("cpu")
    plain, graphed = _pair("unipelt_apl", device)
    batches = _bucketed_batches(WIDTHS)
    plain_losses = _train_plain(plain, batches, 1e-2, device)
    graphed_losses, step = _train_bucketed(graphed, batches, device, max_shapes=2)
    _assert_same_training(plain, graphed, plain_losses, graphed_losses, atol=1e-5)
    assert [key[1][1][1][1] for key in step.shapes] == [16, 32]  # the first two widths got static buffers...
    assert step.seen == 10 and step.eager_steps == 12  # ...the width-48 batches (2) ran plain


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
def test_one_captured_graph_per_bucket_width_trains_like_the_plain_loop_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    plain, graphed = _pair("unipelt_apl", device)
    batches = _bucketed_batches(WIDTHS)
    plain_losses = _train_plain(plain, batches, 1e-2, device)
    graphed_losses, step = _train_bucketed(graphed, batches, device, max_shapes=2)
    assert sum(shape.graph is not None for shape in step.shapes.values()) == 2
    assert step.replays == 6  # widths 16 and 32: 5 batches each, 2 warm-up, then capture + replays
    _assert_same_training(plain, graphed, plain_losses, graphed_losses, atol=1e-4)


def test_a_run_with_graph_buckets_pads_each_batch_to_its_bucket_and_records_the_setting(tmp_path, monkeypatch):
    import unipelt.training.trainer as trainer_module
    from unipelt.run import run_cli

    widths, limits = [], []

    class Spy(GraphedTrainStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            limits.append(self.max_shapes)

        def __call__(self, batch):
            widths.append(batch["input_ids"].shape[1])
            return super().__call__(batch)

    monkeypatch.setattr(trainer_module, "GraphedTrainStep", Spy)
    base = [*TINY, "method=lora", "data.k=32", "data.max_length=80", "train.batch_size=4", "group.enabled=false",
            "train.cuda_graph=true", "+train.graph_bucket=16", f"output.runs_dir={tmp_path}"]
    run_cli(_config(*base))
    record = _record(tmp_path / "rte-lora-k32-d111-s42")
    assert record["status"] == "complete" and record["config"]["train"]["graph_bucket"] == 16
    assert set(widths) <= {16, 32, 48, 64, 80} and len(set(widths)) > 1, widths  # several buckets, all multiples
    assert len(limits) == 1 and limits[0] >= len(set(widths))  # one graph per width seen, at most


def test_graph_bucket_needs_cuda_graph_and_a_positive_width():
    from unipelt.training.trainer import TrainSettings

    with pytest.raises(ValueError, match=r"train.graph_bucket=16 .* needs train.cuda_graph=true"):
        TrainSettings(graph_bucket=16)
    with pytest.raises(ValueError, match=r"train.graph_bucket must be a positive number of tokens or null, got 0"):
        TrainSettings(cuda_graph=True, graph_bucket=0)
    assert TrainSettings(cuda_graph=True, graph_bucket=32).graph_bucket == 32


# --- torch.compile inside the captured step ------------------------------------------------------------------------
@pytest.mark.slow
def test_a_run_with_compile_and_graph_buckets_trains_like_the_graphed_run_without_compile(tmp_path, monkeypatch):
    """train.compile + train.cuda_graph: the step function the graph captures is the compiled model's (here the
    aot_eager backend, which runs the traced graph with the same kernels), with one graph per bucket width; the
    record equals that of the same run graphed without compile."""
    import unipelt.training.trainer as trainer_module
    from unipelt.run import run_cli

    compiled = []
    real_compile = torch.compile

    def spy_compile(model, **kwargs):
        compiled.append(kwargs.get("backend"))
        return real_compile(model, **kwargs)

    monkeypatch.setattr(trainer_module.torch, "compile", spy_compile)
    base = [*TINY, "method=unipelt_apl", "data.k=24", "data.max_length=80", "train.batch_size=4",
            "group.enabled=false", "train.cuda_graph=true", "+train.graph_bucket=16", "output.save_modules=false"]
    rid = "rte-unipelt_apl-k24-d111-s42"
    run_cli(_config(*base, f"output.runs_dir={tmp_path / 'graphed'}"))
    assert compiled == []
    torch._dynamo.reset()
    run_cli(_config(*base, "train.compile=aot_eager", f"output.runs_dir={tmp_path / 'compiled'}"))
    assert compiled == ["aot_eager"]
    plain, fast = _record(tmp_path / "graphed" / rid), _record(tmp_path / "compiled" / rid)
    assert fast["status"] == "complete" and fast["config"]["train"]["compile"] == "aot_eager"
    assert fast["steps"] == plain["steps"] > 0
    assert [h["train_loss"] for h in fast["history"]] == pytest.approx([h["train_loss"] for h in plain["history"]],
                                                                       abs=1e-5)
    assert fast["test_score"] == pytest.approx(plain["test_score"], abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
def test_inductor_compiled_step_captured_per_bucket_width_trains_like_the_plain_loop_on_cuda(monkeypatch):
    """The trainer's train.compile=true + train.cuda_graph=true + train.graph_bucket: inductor's fused kernels
    captured as one graph per width. With inductor's random numbers taken from torch's own ops (fallback_random),
    dropout draws what the plain loop draws, so the two must train alike up to kernel rounding."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.reset()
    device = torch.device("cuda")
    plain, graphed = _pair("unipelt_apl", device)
    batches = _bucketed_batches(WIDTHS)
    plain_losses = _train_plain(plain, batches, 1e-2, device)
    compiled = torch.compile(graphed)
    opt = capturable_adamw(list(graphed.trainable_named_parameters().values()), 1e-2, device=device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    step = GraphedTrainStep(lambda b: compiled(**b).loss, opt, device, warmup=2, max_shapes=2)
    torch.manual_seed(3)
    graphed_losses = []
    for batch in batches:
        graphed_losses.append(step({k: v.to(device) for k, v in batch.items()}).item())
        sched.step()
    assert sum(shape.graph is not None for shape in step.shapes.values()) == 2 and step.replays == 6
    _assert_same_training(plain, graphed, plain_losses, graphed_losses, atol=1e-4)
