"""Grouped training (unipelt/grouping): many runs through one frozen encoder give each run what it gets alone."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import batch, randomize_
from hydra import compose, initialize_config_dir

from unipelt import PeltConfig, PeltModel, preset, tiny_encoder
from unipelt.confdir import CONF_DIR
from unipelt.data import get_task
from unipelt.grouping.engine import GroupEngine, NotGroupable, check_compatible
from unipelt.grouping.runner import partition, solo_reason
from unipelt.grouping.trainer import GroupRun, GroupTrainer
from unipelt.plan import plan
from unipelt.training.batching import Encoded
from unipelt.training.trainer import Trainer, TrainSettings

MIXED = [  # (method, lr, training seed, data seed): methods, learning rates, data and seeds all differ
    ("adapter", 1e-3, 42, 1), ("prefix", 5e-3, 43, 2), ("lora", 5e-3, 44, 3), ("bitfit", 1e-3, 45, 4),
    ("unipelt_apl", 1e-3, 46, 5), ("unipelt_apl_nogate", 1e-3, 47, 6), ("houlsby", 2e-3, 48, 7),
    ("unipelt_ap", 1e-3, 42, 8),
]


def dropout_encoder(arch: str = "bert", hidden_p: float = 0.1, probs_p: float = 0.1):
    """A tiny random encoder with dropout on (tiny_encoder has none), so the per-run dropout streams are tested."""
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(arch, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               vocab_size=100, max_position_embeddings=64, hidden_dropout_prob=hidden_p,
                               attention_probs_dropout_prob=probs_p)
    torch.manual_seed(0)
    return AutoModel.from_config(cfg, attn_implementation="eager")


def toy_data(seed: int, n: int) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    ids = [[1] + torch.randint(2, 100, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]
    return Encoded(ids, None, torch.tensor([int(sum(x) % 2) for x in ids]))


def build_group(specs, root: Path, epochs: int = 3, encoder=dropout_encoder, **settings):
    model = PeltModel(encoder())
    runs = []
    for method, lr, seed, data_seed in specs:
        name = f"{method}_{seed}_{data_seed}"
        torch.manual_seed(seed)
        model.add_task(name, preset(method), 2, activate=False)
        s = TrainSettings(epochs=epochs, batch_size=4, eval_batch_size=8, lr=lr, seed=seed, patience=5, **settings)
        runs.append(GroupRun(name, get_task("rte"), s, toy_data(data_seed, 10), toy_data(data_seed + 100, 9),
                             root / name))
    return model, runs


def train(model, runs, max_length: int = 24):
    trainer = GroupTrainer(model, runs, 0, max_length, "cpu", progress=False)
    trainer.step_losses = {}
    trainer.fit()
    params = {r.name: {k: p.detach().clone() for k, p in model.trainable_named_parameters(r.name).items()}
              for r in runs}
    return trainer.step_losses, params


# --- the forward ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "roberta", "mpnet"])
def test_grouped_forward_equals_each_task_alone(arch):
    names = ["adapter", "houlsby", "prefix", "lora", "bitfit", "unipelt_apl", "unipelt_ap_nogate", "unipelt_aplb",
             "unipelt_l"]
    configs = [preset(name) for name in names[:-1]]
    configs.append(PeltConfig(methods={"lora": {"gate": True, "gate_mode": "multiply"}}))  # gate times s
    model = PeltModel(tiny_encoder(arch, seed=0))
    for i, config in enumerate(configs):
        torch.manual_seed(i)
        model.add_task(f"r{i}", config, 2, activate=False)
    randomize_(model.tasks)  # non-trivial LoRA B, adapter up-projections, gates, prefixes
    model.eval()
    engine = GroupEngine(model, [f"r{i}" for i in range(len(names))], max_length=16)
    ids, mask = batch(0, b=3, t=9)
    with torch.no_grad():
        for runs in ([f"r{i}" for i in range(len(names))], ["r5", "r2"], ["r4"], ["r8", "r3"]):  # all, subsets, one
            logits = engine.forward(runs, ids.repeat(len(runs), 1), mask.repeat(len(runs), 1))
            for j, run in enumerate(runs):
                model.set_active_task(run)
                alone = model(ids, mask).logits
                assert torch.allclose(logits[3 * j:3 * (j + 1)], alone, atol=1e-6), (arch, runs, run)
    engine.close()
    model.set_active_task("r0")  # the group's callables are gone: the model works as before
    with torch.no_grad():
        assert torch.isfinite(model(ids, mask).logits).all()


# --- the contract: each run trains as it would alone ----------------------------------------------------------
def test_a_group_of_mixed_runs_trains_each_run_exactly_as_alone(tmp_path):
    """8 runs that differ in method, learning rate, training seed and data; dropout on in the encoder (hidden and
    attention probabilities) and the heads: every per-step loss, the dev metrics and the trained weights of each
    run match training it alone (fp32 CPU, 1e-5)."""
    model, runs = build_group(MIXED, tmp_path / "group")
    losses, params = train(model, runs)
    group_dev = {r.name: r.result.dev_metrics for r in runs}
    assert all(r.status == "done" and r.result.epochs_run == 3 for r in runs)
    for spec in MIXED:
        model, (run,) = build_group([spec], tmp_path / "alone")
        alone_losses, alone_params = train(model, [run])
        grouped = torch.tensor(losses[run.name])
        assert len(grouped) == 9  # 3 epochs x 3 steps
        assert torch.allclose(grouped, torch.tensor(alone_losses[run.name]), atol=1e-5), run.name
        assert run.result.dev_metrics == pytest.approx(group_dev[run.name], abs=1e-5)
        for key, value in alone_params[run.name].items():
            assert torch.allclose(params[run.name][key], value, atol=1e-5), (run.name, key)
    # and dropout really acted: the same run with dropout off trains differently
    model, (run,) = build_group([MIXED[2]], tmp_path / "nodrop", encoder=lambda: dropout_encoder(hidden_p=0, probs_p=0))
    no_dropout, _ = train(model, [run])
    assert not torch.allclose(torch.tensor(no_dropout[run.name]), torch.tensor(losses[run.name]), atol=1e-4)


def test_a_queued_group_keeps_its_slots_full_and_trains_each_run_exactly_as_alone(tmp_path):
    """7 mixed runs, 3 slots, runs of 1 to 4 epochs, one diverging: waiting runs take the slots of runs that stop
    (done or failed) at epoch boundaries, so runs at different epochs share a forward and carry their AdamW moments
    across re-formed groups; each run's per-step losses, dev metrics and weights are those of training it alone."""
    specs = MIXED[:7]
    epochs = [1, 4, 2, 3, 1, 2, 3]
    model, runs = build_group(specs, tmp_path / "queued")
    for run, n in zip(runs, epochs):
        run.settings.epochs = n
    runs[4].settings.inject_nan_at_step = 2  # fails in its first epoch: its slot goes to the next waiting run
    trainer = GroupTrainer(model, runs, 0, 24, "cpu", progress=False, slots=3)
    trainer.step_losses = {}
    rounds = []
    real_round = trainer._round
    trainer._round = lambda live: rounds.append([(r.name, r.state["epoch"] + 1) for r in live]) or real_round(live)
    reported = []
    trainer.fit(on_finished=lambda done: reported.extend(r.name for r in done))
    assert max(len(r) for r in rounds) == 3 and len(rounds) < sum(epochs)  # slots full, never more than 3
    assert any(len({e for _, e in r}) > 1 for r in rounds)  # a newcomer at epoch 1 beside runs at later epochs
    assert sorted(reported) == sorted(r.name for r in runs)  # every run reported once
    assert runs[4].status == "failed" and [r.status for i, r in enumerate(runs) if i != 4] == ["done"] * 6
    params = {r.name: {k: p.detach().clone() for k, p in model.trainable_named_parameters(r.name).items()}
              for r in runs}
    for i, (spec, n) in enumerate(zip(specs, epochs)):
        if i == 4:
            continue
        alone_model, (alone,) = build_group([spec], tmp_path / "alone", epochs=n)
        alone_losses, alone_params = train(alone_model, [alone])
        assert runs[i].result.epochs_run == n
        assert torch.allclose(torch.tensor(trainer.step_losses[alone.name]), torch.tensor(alone_losses[alone.name]),
                              atol=1e-5), alone.name
        assert runs[i].result.dev_metrics == pytest.approx(alone.result.dev_metrics, abs=1e-5)
        for key, value in alone_params[alone.name].items():
            assert torch.allclose(params[alone.name][key], value, atol=1e-5), (alone.name, key)


def test_the_runner_admits_queued_runs_as_slots_free_and_their_records_match_an_unqueued_group(tmp_path):
    """group.max_runs=2 with group.queue=4: one group of 4 runs, two at a time; each run's task joins the model
    when it takes a slot and leaves once its record is written; the records (test scores, epochs) equal those of
    the same 4 runs trained all at once, and say they shared each forward with 2 runs."""
    from unipelt.grouping import runner

    def cfgs(runs_dir, *extra):
        return [config(*TINY, f"method={m}", "train.epochs=2", f"data.seed={seed}", f"output.runs_dir={runs_dir}",
                       "output.save_modules=false", *extra)
                for m, seed in (("lora", 111), ("unipelt_apl", 222), ("adapter", 333), ("bitfit", 444))]

    attached = []
    real_run_group = runner.run_group

    def spy(plans, device, progress=False, slots=None):
        from unipelt.model import PeltModel

        real_add = PeltModel.add_task
        def add(self, name, *a, **k):
            attached.append((name, sorted(self.tasks)))
            return real_add(self, name, *a, **k)
        PeltModel.add_task = add
        try:
            return real_run_group(plans, device, progress, slots)
        finally:
            PeltModel.add_task = real_add

    runner.run_group = spy
    try:
        queued = runner.execute_many(cfgs(tmp_path / "queued", "group.max_runs=2", "group.queue=4"))
    finally:
        runner.run_group = real_run_group
    together = runner.execute_many(cfgs(tmp_path / "together", "group.max_runs=4"))
    assert [o.status for o in queued] == [o.status for o in together] == ["complete"] * 4
    # run0 and run1 train first; both end after 2 epochs and leave the model; then run2 and run3 take their slots
    assert attached == [("run0", []), ("run1", ["run0"]), ("run2", []), ("run3", ["run2"])]
    for q, t in zip(queued, together):
        assert (q.record["group_size"], t.record["group_size"]) == (2, 4)
        assert q.record["test_score"] == pytest.approx(t.record["test_score"], abs=1e-5)
        assert q.record["epochs_run"] == t.record["epochs_run"] == 2


def test_alone_in_the_engine_matches_the_per_run_trainer_when_there_is_no_randomness(tmp_path):
    """Without dropout (no random streams to differ), a group of one and the per-run Trainer compute the same
    training: same AdamW, schedule, early stopping, per-epoch losses and dev scores."""
    spec = ("unipelt_apl", 2e-3, 42, 3)
    no_dropout = lambda: dropout_encoder(hidden_p=0.0, probs_p=0.0)  # noqa: E731
    model, (run,) = build_group([spec], tmp_path / "group", epochs=4, encoder=no_dropout)
    for head in (model.tasks[run.name].head,):
        head.dropout.p = 0.0
    train(model, [run])
    model2, (run2,) = build_group([spec], tmp_path / "trainer", epochs=4, encoder=no_dropout)
    model2.tasks[run2.name].head.dropout.p = 0.0
    model2.set_active_task(run2.name)
    fit = Trainer(model2, run2.spec, run2.train, run2.dev, run2.settings, 0, run2.run_dir, progress=False).fit()
    assert [h["train_loss"] for h in run.result.history] == pytest.approx([h["train_loss"] for h in fit.history],
                                                                          abs=1e-5)
    assert [h["dev_score"] for h in run.result.history] == pytest.approx([h["dev_score"] for h in fit.history])
    assert run.result.best_epoch == fit.best_epoch


def test_a_nan_in_one_run_fails_that_run_and_the_others_train_as_without_it(tmp_path):
    model, runs = build_group(MIXED[:4], tmp_path / "a")
    runs[1].settings.inject_nan_at_step = 4
    losses, params = train(model, runs)
    assert runs[1].status == "failed" and runs[1].failure.step == 4
    assert [r.status for i, r in enumerate(runs) if i != 1] == ["done"] * 3
    model, clean = build_group([s for i, s in enumerate(MIXED[:4]) if i != 1], tmp_path / "b")
    clean_losses, clean_params = train(model, clean)
    for run in clean:
        assert torch.allclose(torch.tensor(losses[run.name]), torch.tensor(clean_losses[run.name]), atol=1e-6)
        for key, value in clean_params[run.name].items():
            assert torch.equal(params[run.name][key], value) or torch.allclose(params[run.name][key], value, atol=1e-6)


# --- what may share a group -----------------------------------------------------------------------------------
def config(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_a_run_resumes_from_its_checkpoint_in_another_slot_of_a_replanned_group(tmp_path, monkeypatch):
    """A re-run plans groups from the unfinished runs only, so a resumed run can sit in another slot (the sweep
    names slots run0, run1, ...): its checkpoint must still load, and training go on as if never interrupted."""
    specs = [MIXED[2], MIXED[4]]  # lora, unipelt_apl

    def group(root, epochs, keep=(0, 1)):
        """The runs `keep` of `specs` as a group whose slots are named run0, run1, ... in that order."""
        _, runs = build_group(specs, root, epochs=epochs, checkpoint_every_s=0)
        model, kept = PeltModel(dropout_encoder()), []
        for slot, i in enumerate(keep):
            method, _, seed, _ = specs[i]
            torch.manual_seed(seed)
            model.add_task(f"run{slot}", preset(method), 2, activate=False)
            runs[i].name = f"run{slot}"
            kept.append(runs[i])
        return model, kept

    class Killed(Exception):
        pass

    end_epoch = GroupTrainer._end_epoch

    def killed_after_epoch_2(self, run, *args):  # every run has written its epoch-2 checkpoint, then "kill -9"
        end_epoch(self, run, *args)
        if run is self.runs[-1] and run.state["epoch"] == 2:
            raise Killed

    want_losses, want = train(*group(tmp_path / "reference", epochs=3))
    monkeypatch.setattr(GroupTrainer, "_end_epoch", killed_after_epoch_2)
    with pytest.raises(Killed):
        train(*group(tmp_path / "interrupted", epochs=3))
    monkeypatch.undo()
    model, runs = group(tmp_path / "interrupted", epochs=3, keep=(1,))  # unipelt_apl was run1: now alone in run0
    got_losses, got = train(model, runs)
    assert runs[0].state["resumed_from_epoch"] == 2
    for name, tensor in want["run1"].items():
        torch.testing.assert_close(got["run0"][name.replace("tasks.run1.", "tasks.run0.")], tensor, rtol=0, atol=1e-6)
    assert got_losses["run0"] == pytest.approx(want_losses["run1"][-len(got_losses["run0"]):], abs=1e-6)


def test_runs_that_cannot_share_a_forward_are_split_never_merged():
    base = ["task=rte", "data.k=100", "method=lora"]
    plans = [plan(config(*o)) for o in (
        base, [*base[:2], "method=adapter"], [*base, "data.seed=222"],   # one group: same task, K, lengths, ...
        ["task=sst2", "data.k=100", "method=lora"],                        # another task
        ["task=rte", "data.k=500", "method=lora"],                         # another K
        [*base, "data.max_length=64"],                                     # another max length
        [*base, "train.mixed_precision=bf16"],                             # another precision
        [*base, "model.num_layers=2"],                                     # another encoder
        [*base, "train.batch_size=8"],                                     # another batch size
        [*base, "method.pelt.methods.lora.r=4", "data.seed=333"],         # LoRA tensors of another shape
        [*base, "train.deterministic=true", "data.seed=444"],             # torch's deterministic mode (per process)
    )]
    groups = partition(plans, max_runs=16)
    assert [len(g) for g in groups] == [3, 1, 1, 1, 1, 1, 1, 1, 1]
    assert [p.method for p in groups[0]] == ["lora", "adapter", "lora"]
    assert len(partition(plans[:3], max_runs=2)) == 2  # the size limit splits too
    # a set over the limit is split into near-equal groups, in order: 3 runs at 2 -> 2 + 1; 7 at 3 -> 3, 2, 2
    assert [[p.run_id for p in g] for g in partition(plans[:3], max_runs=2)] == [
        [plans[0].run_id, plans[1].run_id], [plans[2].run_id]]


def test_split_evenly_makes_the_fewest_groups_with_sizes_at_most_one_apart():
    from unipelt.grouping.runner import split_evenly

    for n in range(1, 41):
        for size in range(1, 16):
            groups = split_evenly(list(range(n)), size)
            sizes = [len(g) for g in groups]
            assert len(groups) == -(-n // size) and max(sizes) <= size and max(sizes) - min(sizes) <= 1
            assert [x for g in groups for x in g] == list(range(n))  # order kept, nothing lost or repeated
    assert [len(g) for g in split_evenly(list(range(35)), 14)] == [12, 12, 11]  # greedy would give 14, 14, 7
    assert [len(g) for g in split_evenly(list(range(11)), 10)] == [6, 5]  # not 10 + a group of one


def test_runs_the_engine_does_not_cover_train_alone_and_say_why():
    assert solo_reason(p := plan(config("method=lora")), config("method=lora")) is None and p.method == "lora"
    cases = {
        ("method=finetune",): "full fine-tuning",
        ("method=lora", "method.pelt.gate_pooling=all"): "gate_pooling='all'",
        ("method=lora", "method.pelt.methods.lora.dropout=0.1"): "LoRA dropout",
        ("method=lora", "train.compile=true"): "train.compile",
        ("method=lora", "group.enabled=false"): "group.enabled=false",
    }
    for overrides, reason in cases.items():
        cfg = config(*overrides)
        assert reason in solo_reason(plan(cfg), cfg), overrides
    with pytest.raises(NotGroupable, match="cannot share a group"):
        check_compatible([preset("lora"), preset("lora").__class__.from_dict({"methods": {"lora": {"r": 4}}})])


# --- end to end: records, kill -9, devices --------------------------------------------------------------------
TINY = ["model.num_layers=1", "data.k=32", "data.dev_size=16", "data.max_length=32", "output.progress=false",
        "runtime.threads=1", "task=rte"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def cli(args, runs: Path):
    return subprocess.Popen([sys.executable, "-m", "unipelt.run", *args, f"output.runs_dir={runs}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def record(runs: Path, rid: str) -> dict:
    return json.loads((runs / rid / "record.json").read_text())


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_group_then_rerun_resumes_unfinished_runs_and_keeps_finished_ones(tmp_path):
    runs, reference = tmp_path / "runs", tmp_path / "reference"
    sweep = ["-m", *TINY, "method=lora,unipelt_apl", "data.seed=111,222", "train.epochs=6", "train.patience=100"]
    done = cli(["-m", *TINY, "method=lora", "data.seed=333", "train.epochs=6", "train.patience=100"], runs)
    assert done.wait(300) == 0
    finished = (runs / "rte-lora-k32-d333-s42" / "record.json").read_bytes()
    ids = [f"rte-{m}-k32-d{s}-s42" for m in ("lora", "unipelt_apl") for s in (111, 222)]
    proc = cli([*sweep[:-2], "data.seed=111,222,333", *sweep[-2:]], runs)
    states = [runs / rid / "checkpoint" / "state.json" for rid in ids]
    try:
        deadline = time.monotonic() + 300
        while not all(s.is_file() and json.loads(s.read_text())["epoch"] >= 2 for s in states):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert not any((runs / rid / "record.json").exists() for rid in ids), "killed runs leave no record"
    killed_at = {rid: json.loads(s.read_text())["epoch"] for rid, s in zip(ids, states)}
    rerun = cli([*sweep[:-2], "data.seed=111,222,333", *sweep[-2:]], runs)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert "skip rte-lora-k32-d333-s42: complete record exists" in out
    assert (runs / "rte-lora-k32-d333-s42" / "record.json").read_bytes() == finished
    ref = cli(sweep, reference)
    assert ref.wait(300) == 0
    for rid in ids:
        got, want = record(runs, rid), record(reference, rid)
        assert got["status"] == "complete" and got["resumed_from_epoch"] == killed_at[rid] >= 2
        # the re-run's group also held unipelt_apl-d333 (5 runs), the reference's 4: results do not depend on it
        assert got["group_size"] == 5 and want["group_size"] == 4
        assert got["test_score"] == want["test_score"] and got["metrics"] == want["metrics"]
        assert [h["train_loss"] for h in got["history"]] == [h["train_loss"] for h in want["history"]]
        assert not (runs / rid / "checkpoint").exists()


@pytest.mark.slow
def test_a_multirun_is_grouped_and_its_records_say_so_and_report_like_any_other(tmp_path):
    from unipelt.report.records import load_records

    runs = tmp_path / "runs"
    proc = cli(["-m", *TINY, "method=lora,adapter,bitfit", "data.seed=111,222", "train.epochs=2"], runs)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "group of 6 runs (rte, k=32)" in out
    recs = [json.loads(p.read_text()) for p in runs.glob("*/record.json")]
    assert len(recs) == 6 and {r["group_size"] for r in recs} == {6} and {r["status"] for r in recs} == {"complete"}
    loaded = load_records(runs)
    assert len(loaded.records) == 6


@pytest.mark.slow
def test_the_hydra_multirun_spreads_its_jobs_over_the_launchers_devices(tmp_path):
    runs = tmp_path / "runs"
    proc = cli(["-m", *TINY, "method=lora,adapter,finetune", "data.seed=111", "train.epochs=1",
                "hydra.launcher.devices=[cpu,cpu]", "hydra.launcher.solo_workers_per_device=1"], runs)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "2 device(s) x 1 worker(s): cpu, cpu (+ 1 per device for runs that train alone)" in out + err
    recs = {r["method"]: r for r in (json.loads(p.read_text()) for p in runs.glob("*/record.json"))}
    assert sorted(recs) == ["adapter", "finetune", "lora"] and {r["status"] for r in recs.values()} == {"complete"}
    assert recs["lora"]["group_size"] == recs["adapter"]["group_size"] == 2  # one group job, and finetune alone


def test_the_sweep_plans_groups_and_spreads_them_over_every_device(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import sweep

    assert sweep.visible_devices("cuda:0,cuda:1") == ["cuda:0", "cuda:1"]
    extra = [f"output.runs_dir={tmp_path}", "model.num_layers=1"]
    todo = [o for o in sweep.grid(type("A", (), {"ks": "100,500", "seeds": "111,222", "tasks": "rte,stsb",
                                                 "methods": "finetune,lora,unipelt_apl"})())]
    jobs = sweep.plan_jobs(todo, sweep.Composer(extra), max_runs=16)
    sizes = sorted(len(j.overrides) for j in jobs)
    assert sizes == [1] * 8 + [4] * 4  # 8 fine-tuning runs alone, one group per (task, K)
    for job in jobs:  # a group never mixes tasks or K
        keys = {(dict(o.split("=", 1) for o in r)["task"], dict(o.split("=", 1) for o in r)["data.k"])
                for r in job.overrides}
        assert len(keys) == 1
    costs = [j.cost for j in jobs]
    assert costs == sorted(costs, reverse=True)  # largest first: the longest groups start first
    # plans are made once per grid point other than the data seed; the seed's own plan is derived exactly
    from unipelt.plan import plan

    composer = sweep.Composer(extra)
    first = plan(composer(todo[0]))
    for overrides in todo[1:]:
        if [o for o in overrides if not o.startswith("data.seed=")] == [o for o in todo[0] if "data.seed" not in o]:
            derived, full = sweep.with_data_seed(first, overrides), plan(composer(overrides))
            assert (derived.data_seed, derived.run_id, derived.run_dir) == (full.data_seed, full.run_id, full.run_dir)
            assert derived.run_id != first.run_id
    # 4 runs per (task, K) at most 3 a group: 2 + 2, not 3 + a group of one
    assert sorted(len(j.overrides) for j in sweep.plan_jobs(todo, sweep.Composer(extra), max_runs=3)) == [1] * 8 + [2] * 8
    queued = [j for j in sweep.plan_jobs(todo, sweep.Composer(extra), max_runs=2, queued=4) if not j.solo]
    assert [(len(j.overrides), j.slots) for j in queued] == [(4, 2)] * 4  # 4 runs per group, 2 at a time
    # earlier records rank the tasks: STS-B runs took 3x RTE's at K=100 (and a fine-tuning record is ignored)
    history = tmp_path / "history"
    for i, (task, method, secs) in enumerate([("stsb", "lora", 30.0), ("stsb", "adapter", 30.0), ("rte", "lora", 10.0),
                                               ("rte", "finetune", 500.0), ("rte", "bitfit", 0.0)]):
        (history / str(i)).mkdir(parents=True)
        status = "failed" if secs == 0 else "complete"
        (history / str(i) / "record.json").write_text(json.dumps(
            {"status": status, "task": task, "method": method, "k": 100, "time": {"train_s": secs / 3, "eval_s": 2 * secs / 3}}))
    (history / "broken").mkdir()
    (history / "broken" / "record.json").write_text("{not json")
    factors = sweep.task_factors_from([str(history)])
    assert factors == pytest.approx({("stsb", "100"): 1.5, ("rte", "100"): 0.5})
    ranked = [j for j in sweep.plan_jobs(todo, sweep.Composer(extra), max_runs=16, task_factors=factors) if not j.solo]
    first = [dict(o.split("=", 1) for o in j.overrides[0]) for j in ranked]
    # K=500 has no history (factor 1, grid order kept); at K=100 STS-B now goes before RTE
    assert [(f["task"], f["data.k"]) for f in first] == [("rte", "500"), ("stsb", "500"), ("stsb", "100"), ("rte", "100")]
    plain = [j.cost for j in jobs if not j.solo and "data.k=100" in j.overrides[0]]
    assert plain[0] == plain[1]  # without history, the two K=100 groups cost the same
    # solo runs (fine-tuning) go to their own workers on a GPU; group workers take them only once no group is left
    assert sweep.solo_workers(["cuda:0"], None) == 4 and sweep.solo_workers(["cpu"], None) == 0
    from unipelt.grouping.pool import next_job

    assert all(j.cfgs is None and j.slots == (1 if j.solo else 16) for j in jobs)  # the workers compose the overrides
    pending = list(jobs)
    assert next_job(pending, solo_only=True).solo
    firsts = [next_job(pending, solo_only=False) for _ in range(4)]
    assert [len(j.overrides) for j in firsts] == [4] * 4
    assert next_job(pending, solo_only=False).solo  # groups gone: a group worker takes a solo run
    assert len(pending) == 6


@pytest.mark.slow
def test_the_sweep_runs_groups_in_worker_processes_one_per_device_slot(tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "experiments/sweep.py", "--runs-dir", str(runs), "--tasks", "rte", "--ks", "16",
           "--seeds", "111,222", "--methods", "finetune,lora,unipelt_apl", "--devices", "cpu,cpu",
           "--workers-per-device", "1", "--set", "model.num_layers=1", "--set", "train.epochs=2",
           "--set", "data.dev_size=16", "--set", "data.max_length=32", "--log", str(tmp_path / "log.jsonl")]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=root, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["status"] for r in rows} == {"complete"}
    assert sorted(r["group_size"] for r in rows) == [1, 1, 4, 4, 4, 4]
    assert len(list(runs.glob("*/record.json"))) == 6
    # progress: each finished job's line counts the runs finished so far, up to the whole sweep
    counts = [int(c) for c in re.findall(r"; (\d+) of 6 runs finished", proc.stdout)]
    assert len(counts) == 3 and counts == sorted(counts) and counts[-1] == 6, proc.stdout[-2000:]
    # the log is a timeline: each job's worker, planned device and start (what sweep_timeline.py reads)
    assert {r["device"] for r in rows} <= {"cpu"} and all(0 <= r["began_s"] < 400 for r in rows)
    jobs = {(r["worker"], r["began_s"]) for r in rows}
    assert len(jobs) == 3  # one group of 4 and two fine-tuning runs
    sys.path.insert(0, str(root / "experiments"))
    import compare_records
    import sweep_timeline

    assert [j["size"] for j in sorted(sweep_timeline.jobs_of(str(tmp_path / "log.jsonl")), key=lambda j: -j["size"])
            ] == [4, 1, 1]
    assert compare_records.main(str(runs), str(runs)) == 0  # a folder equals itself...
    victim = next(runs.glob("*/record.json"))
    changed = json.loads(victim.read_text())
    changed["test_score"] += 0.5
    other = tmp_path / "other"
    import shutil

    shutil.copytree(runs, other)
    (other / victim.parent.name / "record.json").write_text(json.dumps(changed))
    assert compare_records.main(str(runs), str(other)) == 1  # ...and one changed score is a difference


def test_bad_group_settings_are_clear_errors_and_touch_nothing(tmp_path):
    from unipelt.grouping.runner import execute_many
    from unipelt.plan import ConfigError

    for overrides, message in ((["group.max_runs=0"], "group.max_runs must be a positive integer or null, got 0"),
                               (["group.enabled=maybe"], "group.enabled must be true or false, got 'maybe'"),
                               (["group.eval_rows=0"], "group.eval_rows must be a positive integer or null, got 0"),
                               (["group.queue=-2"], "group.queue must be a positive integer or null, got -2"),
                               (["group.cuda_graph=maybe"], "group.cuda_graph must be true or false, got 'maybe'"),
                               (["group.graph_bucket=0"], "group.graph_bucket must be a positive integer or null, got 0")):
        cfg = config("method=lora", *overrides, f"output.runs_dir={tmp_path / 'runs'}")
        with pytest.raises(ConfigError, match=message):
            plan(cfg)
        (outcome,) = execute_many([cfg])
        assert outcome.status == "error" and message in outcome.message
    assert not (tmp_path / "runs").exists()


def test_group_eval_rows_is_a_token_budget_per_evaluation_forward_and_never_changes_the_metrics(tmp_path):
    """group.eval_rows sizes a grouped evaluation forward as that many rows' worth of tokens at the max length:
    every forward stays within the budget (or holds one row per run), short rows share a forward, and the
    predictions are those of one row per forward."""
    got = []
    for cap in (1, 3, 1024):  # 1: one row per run per forward (budget 24 tokens < 3 runs' shortest rows)
        model, runs = build_group(MIXED[:3], tmp_path / str(cap))
        trainer = GroupTrainer(model, runs, 0, 24, "cpu", progress=False, eval_rows=cap)
        trainer._start()
        shapes = []
        real = trainer.engine.forward
        trainer.engine.forward = lambda *a, **k: shapes.append(tuple(k["input_ids"].shape)) or real(*a, **k)
        got.append((trainer.evaluate_dev(runs), shapes))
    (one, one_shapes), (small, small_shapes), (large, large_shapes) = got
    assert one == small == large
    assert one_shapes == [(3, w) for _, w in one_shapes] and len(one_shapes) == 9  # 9 dev rows per run
    assert all(rows * width <= 3 * 24 or rows == 3 for rows, width in small_shapes)
    assert 1 < len(small_shapes) < 9
    assert [rows for rows, _ in large_shapes] == [24, 3]  # then the runs' eval batch size (8 per run) is the limit


def test_bucketed_optimizer_step_is_each_runs_own_adamw_step(tmp_path):
    """step_optimizers steps runs that share hyper-parameters in one Adam call: bit-identical to each run's own
    optimizer.step(), including runs at different step counts and learning rates."""
    specs = [("lora", 5e-3, 44, 3), ("lora", 5e-3, 45, 4), ("adapter", 1e-3, 46, 5)]
    results = []
    for bucketed in (True, False):
        model, runs = build_group(specs, tmp_path / str(bucketed))
        trainer = GroupTrainer(model, runs, 0, 24, "cpu", progress=False)
        trainer._start()
        g = torch.Generator().manual_seed(0)
        for step in range(3):
            active = runs if step != 1 else runs[:1]  # run 0 gets ahead: different step counts in one bucket
            for r in active:
                for p in model.trainable_named_parameters(r.name).values():
                    p.grad = torch.randn(p.shape, generator=g)
            if bucketed:
                trainer.step_optimizers(active)
            else:
                for r in active:
                    r.optimizer.step()
                    r.scheduler.step()
        results.append({r.name: {k: p.detach().clone() for k, p in model.trainable_named_parameters(r.name).items()}
                        for r in runs})
    for name, params in results[0].items():
        for key, value in params.items():
            assert torch.equal(value, results[1][name][key]), (name, key)


def test_bf16_groups_keep_the_frozen_linears_in_bf16_with_the_same_training_as_autocast_casting_them(tmp_path):
    """Under bf16 the trainer stores the frozen encoder's linears in bf16 once instead of letting autocast cast
    them at every forward: every step's loss and the dev metrics are bit-identical (CPU autocast)."""
    results = []
    for cast in (True, False):
        model, runs = build_group(MIXED[:4], tmp_path / str(cast), epochs=2, mixed_precision="bf16")
        trainer = GroupTrainer(model, runs, 0, 24, "cpu", mixed_precision="bf16", progress=False, cast_frozen=cast)
        trainer.step_losses = {}
        trainer.fit()
        dtypes = {m.weight.dtype for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)}
        assert dtypes == ({torch.bfloat16} if cast else {torch.float32})
        history = [[{k: v for k, v in h.items() if k != "epoch_s"} for h in r.result.history] for r in runs]
        results.append((trainer.step_losses, history))
    assert results[0] == results[1]


def test_an_encoder_dropout_the_backbone_map_misses_refuses_grouping():
    """A dropout the map does not name would draw from torch's global stream and tie the runs together."""
    model = PeltModel(dropout_encoder())
    model.add_task("a", preset("lora"), 2)
    GroupEngine(model, ["a"], max_length=16).close()  # BERT's dropouts are all covered
    model.encoder.encoder.layer[1].intermediate.extra_dropout = torch.nn.Dropout(0.1)
    with pytest.raises(NotGroupable, match=r"encoder\.layer\.1\.intermediate\.extra_dropout"):
        GroupEngine(model, ["a"], max_length=16)


def test_records_from_before_grouping_count_as_per_run_trainer_records():
    """Records written before `group.enabled` existed were made by the per-run trainer: they match
    group.enabled=false (skipped on re-run) and differ from the grouped engine (whose dropout masks differ)."""
    import glob

    from unipelt.training.record import config_diff

    path = sorted(glob.glob(str(Path(__file__).resolve().parents[1] / "experiments/results/low_resource_minilm/runs"
                                "/*-lora-k100-d111-s42/record.json")))[0]
    old = json.loads(Path(path).read_text())["config"]
    assert "group" not in old
    assert not any(d.startswith("group.enabled") for d in config_diff(old, {**old, "group": {"enabled": False}}))
    assert "group.enabled: (absent, i.e. False) -> True" in config_diff(old, {**old, "group": {"enabled": True}})


def test_simulated_makespan_hands_each_job_to_the_first_free_worker():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import sweep

    from unipelt.grouping.pool import Job

    jobs = [Job(None, None, 1, c) for c in (3, 3, 2, 2, 2)]
    assert sweep.simulate_makespan(jobs, 1) == 12
    assert sweep.simulate_makespan(jobs, 2) == 7  # 3 + 2 + 2 on one worker, 3 + 2 on the other
    assert sweep.simulate_makespan(jobs, 5) == 3
    assert sweep.simulate_makespan([Job(None, None, 1, 1.0)] * 4, 2) == 2


def test_a_dry_run_prints_the_plan_and_how_it_balances_and_trains_nothing(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import sweep

    argv = ["--runs-dir", str(tmp_path / "runs"), "--tasks", "rte,stsb", "--ks", "100", "--seeds", "111,222",
            "--methods", "finetune,lora,unipelt_apl", "--max-runs", "2", "--workers-per-device", "2",
            "--devices", "cpu", "--dry-run", "--set", "model.num_layers=1"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "dry run: 12 runs in 4 groups (at most 2 at a time) and 4 runs that train alone" in out
    assert "2 x group of 2   task=rte k=100" in out and "2 x alone        task=stsb k=100" in out
    one = re.search(r"1 device\(s\) x 2 group workers: the groups end at (\d+)", out)
    two = re.search(r"2 device\(s\) x 2 group workers: the groups end at (\d+) .* ([\d.]+)x one device", out)
    assert one and two and float(two.group(2)) == pytest.approx(int(one.group(1)) / int(two.group(1)), abs=0.01)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing trained
    with pytest.raises(SystemExit, match="--dry-run plans grouped sweeps; got --mode packed"):
        sweep.main([*argv, "--mode", "packed"])


@pytest.mark.slow
def test_a_multirun_on_worker_processes_trains_every_run_as_in_one_process(tmp_path, monkeypatch):
    """devices=cpu,cpu: the groups and the run that trains alone go to worker processes (grouping/pool.py), largest
    first; every record equals the one the same runs get in this process (CPU fp32), group sizes included."""
    from unipelt.grouping import pool, runner

    def cfgs(runs_dir):
        return [config(*TINY, f"method={m}", "train.epochs=2", f"data.seed={seed}", f"output.runs_dir={runs_dir}",
                       "output.save_modules=false", "group.max_runs=2")
                for m, seed in (("lora", 111), ("unipelt_apl", 222), ("adapter", 333), ("finetune", 444))]

    here = runner.execute_many(cfgs(tmp_path / "here"))
    dispatched = []
    real_run_jobs = pool.run_jobs

    def spy(jobs, devices, workers_per_device=1, mps="auto", solo_per_device=0):
        dispatched.append(([len(j.cfgs) for j in jobs], [j.slots for j in jobs], [j.solo for j in jobs], devices, mps,
                           solo_per_device))
        return real_run_jobs(jobs, devices, workers_per_device, mps, solo_per_device)

    monkeypatch.setattr(pool, "run_jobs", spy)
    pooled = runner.execute_many(cfgs(tmp_path / "pooled"), devices=["cpu"], workers_per_device=1, mps="auto",
                                 solo_workers_per_device=1)  # one group worker + one for the run that trains alone
    # groups of 2 (lora+apl, adapter) + finetune, which only the solo worker may take while groups are left
    assert dispatched == [([2, 1, 1], [2, 2, 1], [False, False, True], ["cpu"], "auto", 1)]
    assert [o.status for o in pooled] == [o.status for o in here] == ["complete"] * 4
    for a, b in zip(here, pooled):
        assert a.run_id == b.run_id
        for key in ("test_score", "dev_score", "best_epoch", "epochs_run", "group_size"):
            assert a.record[key] == pytest.approx(b.record[key], abs=1e-6), key
    assert len(list((tmp_path / "pooled").glob("*/record.json"))) == 4


def test_a_broken_worker_job_is_an_error_for_its_runs_and_bad_pool_settings_are_clear():
    from unipelt.grouping.pool import Job, maybe_mps, run_jobs

    assert run_jobs([], ["cuda:0"], mps="on") == []  # nothing to do: no workers, no MPS daemon (none here to start)
    (outcomes,) = run_jobs([Job(["not a config"], None, 1)], ["cpu"])
    assert [o.status for o in outcomes] == ["error"] and "worker on cpu failed" in outcomes[0].message
    with pytest.raises(ValueError, match="workers_per_device must be at least 1, got 0"):
        run_jobs([], ["cpu"], workers_per_device=0)
    with pytest.raises(ValueError, match="mps must be auto, on or off, got 'yes'"):
        with maybe_mps(["cuda:0"], "yes"):
            pass


def test_the_worker_pool_replaces_a_worker_that_dies_in_a_job_keeps_solo_workers_to_lone_runs_and_honours_a_deadline():
    """One scheduler for the launcher and experiments/sweep.py (grouping/pool.py): a worker killed in the middle of a
    job (os._exit, as the OOM killer would) turns that job's runs into errors and a fresh worker takes the next job
    (the sweep used to wait for the dead worker forever); solo workers take only runs that train alone."""
    from helpers import compose_or_die

    from unipelt.grouping.pool import Job, WorkerPool

    died, bad = Job(None, [["die"]], 1, cost=2.0), Job(None, [["bad"]], 1, cost=1.0)
    seen = []
    with WorkerPool(["cpu"], 1, compose=compose_or_die) as pool:
        results = pool.run([bad, died], on_result=lambda job, result: seen.append(job.overrides))
        assert seen == [[["die"]], [["bad"]]]  # largest first, each reported as it ends
        assert "died (exit code 9)" in results[1].outcomes[0].message and results[1].outcomes[0].status == "error"
        assert "worker on cpu failed: ValueError: not a run: ['bad']" in results[0].outcomes[0].message
        assert pool.workers[0].is_alive()  # the replacement
        assert pool.run([bad], deadline=time.monotonic() - 1) == [None]  # past the deadline nothing starts
    group, alone = Job(None, [["g1"], ["g2"]], 2, cost=5.0), Job(None, [["solo"]], 1, cost=1.0, solo=True)
    with WorkerPool(["cpu"], 1, solo_per_device=1, compose=compose_or_die) as pool:
        assert pool.kinds == [("cpu", False), ("cpu", True)]
        results = pool.run([alone, group])
    assert [r.worker for r in results] == [1, 0] and len(results[1].outcomes) == 2
    with pytest.raises(ValueError, match="solo workers per device must be at least 0, got -1"):
        WorkerPool(["cpu"], 1, solo_per_device=-1)


def test_automatic_group_size_shares_a_gpus_memory_among_its_workers(monkeypatch, tmp_path):
    from unipelt.grouping import runner

    p = plan(config(*TINY, "method=lora", f"output.runs_dir={tmp_path}"))
    per_run = runner.estimate_run_bytes(p)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * per_run, 100 * per_run))
    cuda = torch.device("cuda")
    assert runner.auto_max_runs([p], cuda) == 40  # half the free memory, one run's estimate each
    assert runner.auto_max_runs([p], cuda, processes=4) == 10  # four workers' groups on that GPU at once
    assert runner.auto_max_runs([p], torch.device("cpu"), processes=4) == runner.CPU_MAX_RUNS
