"""Run many experiments as groups: plan -> split into compatible groups -> train each group -> one record per run.

Runs share a group only when they can share the encoder's forward exactly: same encoder (path, layers), task,
K, data folder and dev size, max length, batch size and precision, and method settings whose stacked tensors
agree (engine.check_compatible). Anything else is split into another group, never merged. Runs the grouped
engine does not cover (full fine-tuning, train.compile / cuda_graph / fp16, gate_pooling=all, ...) train alone
with the per-run trainer.
"""
from __future__ import annotations

import contextlib
import logging
import time
import traceback
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from ..plan import ConfigError, RunInProgress, RunPlan, plan, preflight
from ..training.record import RECORD_FILE, is_complete, peak_memory, write_record
from .engine import NotGroupable, check_compatible

log = logging.getLogger("unipelt.group")

CPU_MAX_RUNS = 16
GPU_MAX_RUNS = 64


@dataclass
class Outcome:
    """What happened to one requested run."""

    run_id: str | None
    status: str  # complete | failed | skipped | error
    record: dict | None = None
    message: str = ""
    error: BaseException | None = None  # the exception behind an 'error' outcome (re-raised for a single run)


def solo_reason(p: RunPlan, cfg: DictConfig) -> str | None:
    """Why a run must train alone with the per-run trainer (None: it can train in a group)."""
    group = cfg.get("group") or {}
    s = p.settings
    if not group.get("enabled", True):
        return "group.enabled=false"
    if any(name == "finetune" for name in p.pelt.methods):
        return "full fine-tuning trains the encoder, which a group shares"
    if s.compile is not False or s.cuda_graph is True:  # "auto" stays off in a group (plan.resolve_auto_graphs)
        return "train.compile / train.cuda_graph use the per-run trainer"
    if s.mixed_precision == "fp16":
        return "fp16 needs a per-run GradScaler"
    if p.init_modules is not None:
        return "init.modules starts from saved modules (per-run trainer)"
    try:
        check_compatible([p.pelt])
    except NotGroupable as err:
        return str(err)
    return None


def group_key(p: RunPlan) -> tuple:
    """What runs must share to go through one forward (method compatibility is checked on top of this)."""
    s = p.settings
    return (str(p.model_path), p.model_name, p.num_layers, p.spec.name, str(p.k), str(p.data_dir), p.dev_size,
            p.max_length, s.batch_size, s.mixed_precision, s.deterministic,  # deterministic: a process-wide mode
            graph_settings(p.config or {}), activations(p.config or {}), attention_dropout(p.config or {}))


def activations(cfg) -> str:
    """group.activations of a run's config ("fp32" where absent: records from before the setting)."""
    return _group_setting(cfg, "activations") or "fp32"


def attention_dropout(cfg) -> str:
    """group.attention_dropout of a run's config ("per_run" where absent: records from before the setting)."""
    return _group_setting(cfg, "attention_dropout") or "per_run"


def graph_settings(cfg) -> tuple[bool, int | None]:
    """(group.cuda_graph, group.graph_bucket) of a run's config: a group's steps are graphed (and padded) or not."""
    return bool(_group_setting(cfg, "cuda_graph") or False), _group_setting(cfg, "graph_bucket")


def partition(plans: list[RunPlan], max_runs: int) -> list[list[RunPlan]]:
    """Compatible groups of at most `max_runs`, in first-seen order: a run joins the first set whose key matches
    and whose methods it can share a forward with; a set larger than `max_runs` is then split into groups whose
    sizes differ by at most one (35 runs at 14 -> 12, 12, 11, not 14, 14, 7: a short last group would hold a
    worker, a process and an encoder for a few runs while the others still train)."""
    sets: list[list[RunPlan]] = []
    for p in plans:
        for s in sets:
            if group_key(s[0]) == group_key(p):
                try:
                    check_compatible([q.pelt for q in s] + [p.pelt])
                except NotGroupable:
                    continue
                s.append(p)
                break
        else:
            sets.append([p])
    return [group for s in sets for group in split_evenly(s, max_runs)]


def split_evenly(members: list, size: int) -> list[list]:
    """`members`, in order, as the fewest groups of at most `size` whose sizes differ by at most one."""
    n_groups = -(-len(members) // max(1, size))
    base, larger = divmod(len(members), n_groups)
    groups, start = [], 0
    for i in range(n_groups):
        end = start + base + (i < larger)
        groups.append(members[start:end])
        start = end
    return groups


def auto_max_runs(plans: list[RunPlan], device: torch.device, model_cfg=None, processes: int = 1) -> int:
    """Runs per group from free device memory, shared by `processes` groups training on it at once: activations of
    one run's training step (with its dropout noise) estimated from the encoder's shape, times a safety factor; CPU
    groups stay at CPU_MAX_RUNS."""
    if device.type != "cuda":
        return CPU_MAX_RUNS
    free, _ = torch.cuda.mem_get_info(device)
    per_run = max(estimate_run_bytes(p, model_cfg) for p in plans)
    return max(1, min(GPU_MAX_RUNS, int(0.5 * free / processes // per_run)))


def estimate_run_bytes(p: RunPlan, model_cfg=None) -> int:
    """Rough bytes one run adds to a grouped step: saved activations (about 20 hidden-sized tensors and 3
    score-sized ones per layer per token, 2-4 bytes each) plus its dropout noise (2 bytes per element)."""
    h = getattr(model_cfg, "hidden_size", 768)
    layers = p.num_layers or getattr(model_cfg, "num_hidden_layers", 12)
    heads = getattr(model_cfg, "num_attention_heads", 12)
    tokens = p.settings.batch_size * p.max_length
    per_layer = tokens * (20 * h * 3 + 3 * heads * p.max_length * 3)
    noise = tokens * layers * (2 * h + heads * p.max_length) * 2
    return int(layers * per_layer + noise + 64 * 2**20)


def execute_many(cfgs: list[DictConfig], overrides: list[list[str]] | None = None, device: str | None = None,
                 max_runs: int | None = None, progress: bool | None = None, queue: int | None = None,
                 devices: list[str] | None = None, workers_per_device: int = 1, mps: str = "auto",
                 solo_workers_per_device: int = 0) -> list[Outcome]:
    """Run every config; groupable runs in groups, the rest alone. Never raises for one run's problem: each
    config gets an Outcome (bad settings: 'error' with the message, nothing touched). A group trains `max_runs`
    runs at once (group.max_runs; automatic from memory) out of up to `queue` (group.queue; default max_runs): the
    others wait and take the slots of runs that stop. `devices` with more than one worker in all (several devices,
    or `workers_per_device` > 1): the groups and lone runs go to worker processes on those devices (pool.py; `mps`
    auto | on | off; `solo_workers_per_device` more processes that take only the runs that train alone, beside the
    groups), each trained as it would be here; otherwise everything runs in this process on `device`."""
    from ..run import USER_ERRORS, _message, _skip_complete, execute_single

    outcomes: list[Outcome | None] = [None] * len(cfgs)
    grouped: list[tuple[int, RunPlan]] = []
    alone: list[tuple[int, RunPlan]] = []
    model_cfg = None  # the encoder's config, read by preflight: sizes groups from the real encoder's shape
    for i, cfg in enumerate(cfgs):
        try:
            p = plan(cfg)
            p.overrides = None if overrides is None else list(overrides[i])
            if not p.force and _skip_complete(p, p.run_dir / RECORD_FILE):
                outcomes[i] = Outcome(p.run_id, "skipped")
                continue
            reason = solo_reason(p, cfg)
            if reason is None:
                model_cfg = preflight(p)
                grouped.append((i, p))
                continue
        except USER_ERRORS as err:
            outcomes[i] = Outcome(None, "error", message=_message(err))
            continue
        log.info("%s trains alone: %s", p.run_id, reason)
        alone.append((i, p))
    pooled = devices is not None and len(devices) * (workers_per_device + solo_workers_per_device) > 1
    if not pooled:
        for i, p in alone:
            outcomes[i] = _run_alone(cfgs[i], p, execute_single)
    if grouped:
        first_device = devices[0] if pooled else device
        dev = torch.device(first_device or ("cuda" if torch.cuda.is_available() else "cpu"))
        plans = [p for _, p in grouped]
        first_cfg = cfgs[grouped[0][0]]
        limit = max_runs or _group_setting(first_cfg, "max_runs") or auto_max_runs(
            plans, dev, model_cfg, processes=workers_per_device if pooled else 1)  # pooled: the device's workers share it
        total = max(limit, queue or _group_setting(first_cfg, "queue") or limit)
        index = {id(p): i for i, p in grouped}
        groups = partition(plans, total)
    else:
        limit, index, groups = 1, {}, []
    if pooled:
        _run_pooled(cfgs, overrides, outcomes, [[index[id(p)] for p in g] for g in groups], [i for i, _ in alone],
                    limit, devices, workers_per_device, mps, solo_workers_per_device)
        return outcomes
    if grouped:
        for members in groups:
            show = progress if progress is not None else bool(cfgs[index[id(members[0])]].output.progress)
            try:
                results = run_group(members, dev, show, slots=limit)
            except USER_ERRORS as err:  # e.g. the encoder cannot be loaded: every member says so, no record
                results = [Outcome(p.run_id, "error", message=_message(err), error=err) for p in members]
            for p, outcome in zip(members, results):
                outcomes[index[id(p)]] = outcome
    return outcomes


def _run_pooled(cfgs, overrides, outcomes: list, groups: list[list[int]], alone: list[int], slots: int,
                devices: list[str], workers_per_device: int, mps: str, solo_per_device: int = 0) -> None:
    """The groups (config indices) and lone runs as jobs of worker processes (pool.run_jobs); fills `outcomes`."""
    from .pool import Job, run_jobs

    def job(indices: list[int], job_slots: int, solo: bool) -> Job:
        return Job([cfgs[i] for i in indices], None if overrides is None else [list(overrides[i]) for i in indices],
                   job_slots, cost=float(len(indices)), solo=solo)

    plan_order = [(g, job(g, slots, False)) for g in groups] + [([i], job([i], 1, True)) for i in alone]
    results = run_jobs([j for _, j in plan_order], devices, workers_per_device, mps, solo_per_device)
    for (indices, _), result in zip(plan_order, results):
        for i, outcome in zip(indices, result):
            outcomes[i] = outcome


def _group_setting(cfg, name: str) -> int | None:
    return (cfg.get("group") or {}).get(name)  # validated by plan()


def _run_alone(cfg, p: RunPlan, execute_single) -> Outcome:
    from ..run import USER_ERRORS, RunFailed, _message

    try:
        record = execute_single(cfg, p)
    except RunFailed as err:
        return Outcome(p.run_id, "failed", message=str(err))
    except USER_ERRORS as err:
        return Outcome(p.run_id, "error", message=_message(err))
    return Outcome(p.run_id, "skipped" if record is None else "complete", record)


def _task_name(i: int) -> str:
    return f"run{i}"


def run_group(plans: list[RunPlan], device: torch.device, progress: bool = False,
              slots: int | None = None) -> list[Outcome]:
    """Train one compatible group, `slots` runs at once (None: all); every run gets a record (complete or failed)
    or an Outcome saying why not. A run's task joins the model when it takes a slot and leaves once it is done."""
    from ..data import build_task_data
    from ..encoders import load_encoder, load_tokenizer
    from ..io import save_task
    from ..model import PeltModel
    from ..run import USER_ERRORS, _message, _write_failed, complete_record, done_message, start_record
    from ..training.batching import encode
    from ..training.checkpoint import Checkpointer
    from ..training.lock import run_lock
    from .trainer import EVAL_ROWS, GroupRun, GroupTrainer

    outcomes = {p.run_id: None for p in plans}
    datasets = {}
    for p in plans:  # data problems are bad settings: reported before any file is touched
        try:
            datasets[p.run_id] = build_task_data(p.spec, p.k, p.data_seed, p.data_dir, p.dev_size)
        except USER_ERRORS as err:
            outcomes[p.run_id] = Outcome(p.run_id, "error", message=_message(err), error=err)
    with contextlib.ExitStack() as locks:
        members = []
        for p in plans:
            if outcomes[p.run_id] is not None:
                continue
            try:
                locks.enter_context(run_lock(p.run_dir))
            except RunInProgress as err:
                outcomes[p.run_id] = Outcome(p.run_id, "error", message=str(err), error=err)
                continue
            if not p.force and is_complete(p.run_dir / RECORD_FILE):  # finished by another process meanwhile
                outcomes[p.run_id] = Outcome(p.run_id, "skipped")
                continue
            if p.force:
                Checkpointer(p.run_dir / "checkpoint").clear()
            members.append(p)
        if not members:
            return [outcomes[p.run_id] for p in plans]
        first = members[0]
        if first.threads:
            torch.set_num_threads(first.threads)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            tokenizer = load_tokenizer(first.model_path)
            model = PeltModel(load_encoder(first.model_path, num_layers=first.num_layers))
        except OSError as err:
            raise ConfigError(f"model {first.model_name!r}: {err}") from None
        model.to(device)
        size = len(members) if slots is None else min(slots, len(members))  # runs that share a forward
        runs, records, tests = [], {}, None
        for i, p in enumerate(members):
            data = datasets[p.run_id]
            if tests is None:  # the test sets (GLUE dev) are the same for every run of the task
                tests = {split: encode(ds, p.spec, tokenizer, p.max_length) for split, ds in data.test.items()}
            runs.append(GroupRun(_task_name(i), p.spec, p.settings,
                                 encode(data.train, p.spec, tokenizer, p.max_length),
                                 encode(data.dev, p.spec, tokenizer, p.max_length), p.run_dir, p.config))
        plan_of = {_task_name(i): p for i, p in enumerate(members)}

        def admit(run: GroupRun) -> None:
            p = plan_of[run.name]
            torch.manual_seed(p.settings.seed)  # a run's initial modules depend on its seed alone, not its group
            model.add_task(run.name, p.pelt, p.spec.num_labels, activate=False)
            p.run_dir.mkdir(parents=True, exist_ok=True)
            records[run.name] = start_record(None, p, datasets[p.run_id], model, run.name, str(device),
                                             group_size=size)

        eval_rows = _group_setting(first.config or {}, "eval_rows") or EVAL_ROWS
        cuda_graph, graph_bucket = graph_settings(first.config or {})
        trainer = GroupTrainer(model, runs, tokenizer.pad_token_id, first.max_length, device,
                               first.settings.mixed_precision, progress=progress, eval_rows=eval_rows, slots=size,
                               admit=admit, release=lambda run: model.remove_task(run.name), cuda_graph=cuda_graph,
                               graph_bucket=graph_bucket, activations=activations(first.config or {}),
                               attention_dropout=attention_dropout(first.config or {}))
        if len(runs) > 1:
            queued = f", {size} at a time" if size < len(runs) else ""
            print(f"group of {len(runs)} runs ({first.spec.name}, k={first.k}{queued}) on {device}", flush=True)

        def finished(done: list[GroupRun]) -> None:
            ok = [r for r in done if r.status == "done"]
            for r in done:
                if r.status == "failed":
                    _fail(r, plan_of[r.name], records[r.name], diverged=True)
                    p = plan_of[r.name]
                    outcomes[p.run_id] = Outcome(p.run_id, "failed", records[r.name],
                                                 f"{p.run_id}: {r.failure}; failed record written to "
                                                 f"{str(p.run_dir / RECORD_FILE)!r}")
            if not ok:
                return
            t0 = time.perf_counter()
            metrics = [dict() for _ in ok]
            gates = [dict() for _ in ok]
            for j, (split, enc) in enumerate(tests.items()):
                split_metrics, split_gates = trainer.evaluate_shared(ok, enc, split=split, gate_stats=(j == 0))
                for m, g, sm, sg in zip(metrics, gates, split_metrics, split_gates):
                    m.update(sm)
                    if j == 0:
                        g.update(sg)
            test_time = time.perf_counter() - t0
            n_test = sum(len(enc) for enc in tests.values())
            for r, m, g in zip(ok, metrics, gates):
                p = plan_of[r.name]
                fit = r.result
                record = complete_record(records[r.name], p, fit, m, g, r.state["eval_time"] + test_time / len(ok),
                                         test_time / len(ok) / max(n_test, 1), peak_memory(device))
                if p.config and (p.config.get("output") or {}).get("save_modules", True):
                    save_task(model, p.run_dir / "modules", task=r.name, save_as=p.spec.name,
                              extra={"run_id": p.run_id, "best_epoch": fit.best_epoch})
                write_record(p.run_dir / RECORD_FILE, record)
                r.checkpoints.clear()
                outcomes[p.run_id] = Outcome(p.run_id, "complete", record)
                print(done_message(p, record, fit), flush=True)

        try:
            trainer.fit(on_finished=finished)
        except Exception as err:  # OOM, a full disk, a bug: every unfinished run gets a failed record, checkpoints
            # stay (every saved epoch is sound), so re-running the same command resumes them
            tb = traceback.format_exc(limit=20)
            for r in runs:
                p = plan_of[r.name]
                if outcomes[p.run_id] is None and r.name not in records:  # still waiting for a slot: untouched
                    outcomes[p.run_id] = Outcome(p.run_id, "failed", None, f"{p.run_id}: not started (its group "
                                                 f"stopped: {type(err).__name__}: {err}); re-running trains it")
                elif outcomes[p.run_id] is None:
                    failure = {"error": f"{type(err).__name__}: {err}", "type": type(err).__name__,
                               "step": r.state.get("step"), "epoch": r.state.get("epoch"), "traceback": tb}
                    _write_failed(p.run_dir / RECORD_FILE, records[r.name], r, failure)
                    outcomes[p.run_id] = Outcome(p.run_id, "failed", records[r.name],
                                                 f"{p.run_id}: {type(err).__name__}: {err}; the last checkpoint is "
                                                 f"kept, so re-running resumes")
        finally:
            trainer.close()
            del model, trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return [outcomes[p.run_id] for p in plans]


def _fail(run, p: RunPlan, record: dict, diverged: bool) -> None:
    from ..run import _write_failed

    err = run.failure
    run.checkpoints.clear()  # a retry under the same settings would diverge again: start over
    failure = {"error": str(err), "type": "TrainingDiverged", "step": err.step, "epoch": err.epoch}
    _write_failed(p.run_dir / RECORD_FILE, record, run, failure)
    print(f"failed {p.run_id}: {err}", flush=True)

