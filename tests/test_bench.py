"""unipelt-bench at real lengths: batches drawn from a GLUE dev set, padded per batch or to length buckets."""
from __future__ import annotations

import json

import pytest
import torch

from unipelt import bench
from unipelt.data import get_task
from unipelt.data.glue import default_data_dir, load_split
from unipelt.encoders import load_tokenizer


@pytest.mark.parametrize("task", ["rte", "sst2"])
def test_task_batches_are_real_dev_rows_padded_per_batch_or_to_buckets(task):
    tokenizer = load_tokenizer("minilm")
    spec = get_task(task)
    plain = bench.task_batches(task, tokenizer, 8, 3, "cpu", default_data_dir())
    bucketed = bench.task_batches(task, tokenizer, 8, 3, "cpu", default_data_dir(), pad_multiple=32)
    rows = load_split(spec, "dev", default_data_dir()).shuffle(seed=0)
    for i, (b, p) in enumerate(zip(plain, bucketed)):
        part = rows.select(range(8 * i, 8 * (i + 1)))
        enc = tokenizer(*[list(part[f]) for f in spec.text_fields], truncation=True, max_length=128)
        lengths = [len(x) for x in enc["input_ids"]]
        assert b["attention_mask"].sum(1).tolist() == lengths == p["attention_mask"].sum(1).tolist()
        assert b["input_ids"].shape == (8, max(lengths))  # dynamic padding: the batch's longest row
        width = p["input_ids"].shape[1]
        assert width >= max(lengths) and (width % 32 == 0 or width == 128) and width - max(lengths) < 32
        assert b["input_ids"][0, :lengths[0]].tolist() == enc["input_ids"][0]
        assert torch.equal(p["input_ids"][:, :b["input_ids"].shape[1]], b["input_ids"])
    if task == "sst2":  # short sentences: real widths differ from batch to batch and stay far below 128
        assert len({b["input_ids"].shape[1] for b in plain}) > 1 and max(b["input_ids"].shape[1] for b in plain) < 128


def test_bench_rows_at_a_fixed_and_at_a_task_length(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "minilm", "--methods", "lora", "--dtypes", "fp32", "--batches", "4",
                       "--length", "16,sst2", "--steps", "1", "--warmup", "1", "--device", "cpu",
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["length"] for r in rows] == [16, "sst2"]
    assert rows[0]["widths"] == [16] and rows[0]["mean_width"] == 16
    assert max(rows[1]["widths"]) < 128 and min(rows[1]["widths"]) <= rows[1]["mean_width"] <= max(rows[1]["widths"])
    assert rows[1]["tflops"] < rows[0]["tflops"] * 128 / 16
    assert "sst2 (mean" in out.with_suffix(".md").read_text()
    assert [(r["graphed"], r["compiled"]) for r in rows] == [(False, False)] * 2  # eager rows say so (summary.json)


def test_an_inference_only_bench_row_times_no_training_step(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "minilm", "--methods", "unipelt_apl", "--dtypes", "fp32", "--batches", "2",
                       "--length", "16", "--steps", "1", "--warmup", "1", "--device", "cpu", "--phases", "infer",
                       "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["train_step_ms"] is None and row["mfu"] is None and row["infer_ms"] > 0
    assert "| - | - | - |" in out.with_suffix(".md").read_text()  # no step time, ratio or MFU


def test_bad_lengths_and_buckets_are_clear_errors(capsys):
    for argv, message in ((["--length", "128,foo"], "--length 'foo' is neither a number of tokens nor a GLUE task"),
                          (["--graph-bucket", "0"], "--graph-bucket must be a positive number of tokens, got 0"),
                          (["--phases", "train,eval"], "--phases 'train,eval': give train and/or infer")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert message in capsys.readouterr().err


def test_graphed_bench_rows_time_inference_on_the_deployment_path_prefix_folded_with_the_eager_logits():
    """Under --cuda-graph the inference timings go through GraphedForward with the prefix folded (on CPU the
    static-buffer path): the model a row leaves behind is folded, and its graphed forward gives the eager logits."""
    from unipelt import tiny_encoder

    base = tiny_encoder("bert", seed=0, vocab=1100)  # make_batches draws token ids from 1000 up
    built = {}

    def build():
        built["parts"] = bench.build_unipelt(base, "unipelt_apl", torch.device("cpu"), None, None)
        return built["parts"]

    batches = bench.make_batches(base.config.vocab_size, 4, 12, 3, torch.device("cpu"))
    row = bench.bench_one("unipelt_apl", build, batches, "fp32", 2, 1, torch.device("cpu"), False, cuda_graph=True,
                          max_shapes=2)
    model, _, _, infer_fn = built["parts"]
    assert row["infer_ms"] > 0 and model.active.methods["prefix"].folded
    graphed = bench.GraphedForward(infer_fn, "cpu", None, max_shapes=2)
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(graphed(batch), infer_fn(batch), atol=1e-6, rtol=0)


def _row(method, train, infer, graphed=False, compiled=False, device="NVIDIA H100 80GB HBM3", **kw):
    row = {"model": "bert-base", "dtype": "bf16", "batch": 32, "length": 128, "method": method, "train_step_ms": train,
           "infer_ms": infer, "graphed": graphed, "compiled": compiled, "device": device,
           "mfu": 10.0 / train if train else None}
    row.update(kw)
    return row


def test_the_summary_picks_each_figure_in_its_fastest_mode_and_checks_the_targets(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import bench_summary

    eager = [_row("peft_lora", 40.0, 9.0), _row("unipelt_apl", 85.0, 25.0), _row("finetune", 35.0, 8.0),
             _row("unipelt_apl", 80.0, 20.0, batch=16)]  # another batch size: ignored
    graphed = [_row("peft_lora", 9.0, 4.0, graphed=True), _row("unipelt_apl", 15.0, 5.5, graphed=True),
               _row("finetune", 12.0, 3.0, graphed=True)]
    compiled = [_row("unipelt_apl", 11.0, 6.0, graphed=True, compiled=True),
                _row("peft_lora", 8.0, 3.5, graphed=True, compiled=True), _row("peft_lora", 7.0, 3.0, compiled=True),
                _row("finetune", None, 2.5, graphed=True, compiled=True)]  # inference only (--phases infer)
    files = []
    for name, rows in (("eager", eager), ("graphed", graphed), ("compiled", compiled)):
        files.append(str(tmp_path / f"{name}.json"))
        Path(files[-1]).write_text(json.dumps({"rows": rows} if name != "compiled" else rows))  # both layouts
    out = tmp_path / "summary.json"
    assert bench_summary.main([*files, "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    # train: the compiled + graphed step (11.0); inference: the graphed one (5.5); peft LoRA as it runs (40.0, not
    # the compiled-only 7.0) and in its fastest graphed mode (compiled + graphed 8.0, as APL's)
    assert (s["apl_train_ms"], s["apl_infer_ms"], s["peft_lora_eager_ms"], s["peft_lora_graphed_ms"],
            s["finetune_infer_ms"]) == (11.0, 5.5, 40.0, 8.0, 2.5)
    assert s["modes"] == {"apl_train": "compiled+graphed", "apl_infer": "graphed",
                          "finetune_infer": "compiled+graphed", "peft_lora_graphed": "compiled+graphed"}
    assert s["apl_mfu"] == pytest.approx(10.0 / 11.0, abs=1e-4) and s["device"] == "NVIDIA H100 80GB HBM3"
    assert s["ratios"]["apl_vs_lora_graphed"] == pytest.approx(11.0 / 8.0, abs=1e-3)
    assert s["targets_met"] == {"apl_vs_lora_graphed": False, "apl_vs_lora_eager": True,
                                "apl_infer_vs_finetune": False, "apl_mfu": True}  # 5.5 / 2.5 = 2.2 > 1.3
    # rows of two devices are never mixed; a missing row is named
    Path(files[2]).write_text(json.dumps([_row("unipelt_apl", 11.0, 6.0, device="NVIDIA H200")]))
    with pytest.raises(SystemExit, match="2 devices"):
        bench_summary.main(files)
    with pytest.raises(SystemExit, match="no graphed peft_lora row"):
        bench_summary.main(files[:1])


def test_a_bench_cut_short_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    real = bench.bench_one
    calls = []

    def one_then_stop(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a time limit does: not a row failure, the process ends
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "bench_one", one_then_stop)
    out = tmp_path / "cut.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--models", "minilm", "--methods", "lora,adapter", "--dtypes", "fp32", "--batches", "2",
                    "--length", "16", "--steps", "1", "--warmup", "1", "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved["rows"]] == ["lora"] and "lora" in out.with_suffix(".md").read_text()
