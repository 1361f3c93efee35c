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


def test_bad_lengths_and_buckets_are_clear_errors(capsys):
    for argv, message in ((["--length", "128,foo"], "--length 'foo' is neither a number of tokens nor a GLUE task"),
                          (["--graph-bucket", "0"], "--graph-bucket must be a positive number of tokens, got 0")):
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
