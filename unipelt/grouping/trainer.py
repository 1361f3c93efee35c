"""Train R runs at once through one frozen encoder: one grouped forward and one backward per step.

Each run keeps everything a run trained alone has (training/trainer.py): its own AdamW, linear schedule and
learning rate, its data order (a function of its seed and epoch), its dropout stream (grouping/noise.py), early
stopping, best state, checkpoints (the same files as a run trained alone) and log.csv. Runs advance one epoch per
round; a run that stops (early stopping, epochs, max_steps) or diverges leaves the group and the others go on.
Resumed runs rejoin at their own epoch, so the runs of one group need not be at the same epoch.

A group may be given more runs than it trains at once (`slots`): the others wait in order, and when runs stop, the
next ones take their slots at the epoch boundary (the group is re-formed: the live runs' parameters and AdamW moments
carry over exactly, as through a checkpoint). A group then keeps its slots full instead of stepping a shrinking
remnant of runs (a step costs about the same for 2 runs as for 12) and ends when its work ends, not when its
slowest run ends. Which run takes a slot, and when, depends only on the runs' own training (their early stopping),
never on timing, so a group trains the same way on any device or worker.

Rows are independent through the frozen encoder and each run's loss depends only on its own parameters, so the
sum of the runs' losses gives every run exactly the gradient it would get alone.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.optim.adam import adam as adam_functional
from tqdm.auto import tqdm

from ..data import TaskSpec
from ..metrics import compute_metrics, main_score
from ..model import PeltModel
from ..training.batching import Encoded, epoch_order
from ..training.checkpoint import Checkpointer, load_optimizer_state
from ..training.cuda_graph import DEFAULT_GRAPH_BUCKET, bucket_width
from ..training.determinism import deterministic_algorithms
from ..training.trainer import FitResult, TrainingDiverged, TrainSettings, write_log
from ..training.tracking import RunTracker
from .activations import check_activations, use_bf16_stream
from .attention import check_attention_dropout
from .engine import GroupEngine
from .graphs import GroupStepGraphs
from .stacks import StackedAdamW
from .transfer import to_device
from .noise import NoiseBatch, RunNoise

log = logging.getLogger("unipelt.group")
EVAL_ROWS = 1024  # group.eval_rows default: a grouped evaluation forward holds at most this many rows' worth of tokens
# at the full max length (eval_chunks); 4096 rows ran out of memory with several group processes on one H100
# (experiments/results/grouped_minilm/README.md)


@dataclass
class GroupRun:
    """One member of a group: its task name in the shared model, data, settings and files."""

    name: str
    spec: TaskSpec
    settings: TrainSettings
    train: Encoded
    dev: Encoded
    run_dir: Path
    config: dict | None = None
    # live state, filled by the trainer
    status: str = "live"  # live | done | failed
    failure: BaseException | None = None
    state: dict = field(default_factory=dict)
    best_state: dict | None = None
    result: FitResult | None = None


class RowBank:
    """Token rows of several splits padded once and kept on the device; a batch is one gather."""

    def __init__(self, splits: list[Encoded], pad_id: int, device, bucket: int | None = None,
                 max_length: int | None = None) -> None:
        """`bucket`: batches are padded to the next multiple of `bucket` tokens (at most `max_length`; see
        `bucket_width`) instead of to their longest row, so that they come in a few widths (one CUDA graph each)."""
        rows = [ids for split in splits for ids in split.input_ids]
        types = [t for split in splits for t in (split.token_type_ids or [[0] * len(i) for i in split.input_ids])]
        self.lengths = [len(r) for r in rows]
        self.bucket = bucket
        self.cap = max(max(self.lengths), max_length or 0)
        width = self.width(max(self.lengths))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        tt = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, t) in enumerate(zip(rows, types)):
            ids[i, : len(r)] = torch.tensor(r)
            tt[i, : len(t)] = torch.tensor(t)
        self.has_types = any(split.token_type_ids is not None for split in splits)
        self.offsets = []
        start = 0
        for split in splits:
            self.offsets.append(start)
            start += len(split)
        self.ids = ids.to(device)
        self.types = tt.to(device) if self.has_types else None
        self.labels = torch.cat([split.labels for split in splits]).to(device)
        self.length_t = torch.tensor(self.lengths).to(device)
        self.positions = torch.arange(width).to(device)
        self.device = device

    def batch(self, rows: list[int]) -> dict:
        """Inputs of `rows`, padded to `width` of their longest row. No host sync: the row list reaches the device
        through a non-blocking copy and the mask is built there, so the host can queue steps ahead of the GPU."""
        width = self.width(max(self.lengths[i] for i in rows))
        index = to_device(rows, torch.long, self.device)
        ids = self.ids.index_select(0, index)[:, :width]
        mask = (self.positions[:width][None, :] < self.length_t.index_select(0, index)[:, None]).long()
        out = {"input_ids": ids, "attention_mask": mask, "labels": self.labels.index_select(0, index)}
        if self.types is not None:
            out["token_type_ids"] = self.types.index_select(0, index)[:, :width]
        return out

    def width(self, longest: int) -> int:
        """Tokens per row of a batch whose longest row has `longest`."""
        return longest if self.bucket is None else bucket_width(longest, self.bucket, self.cap)


def cast_frozen_linears(encoder: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen encoder's linear weights and biases in `dtype` once. Under autocast every F.linear casts
    its fp32 weight to bf16 anew (autocast keeps casts only of weights that require grad), one cast kernel per
    linear per forward; a bf16 copy gives bit-identical results without them. Layer norms and embeddings, which
    autocast runs in fp32, keep fp32. Returns how many linears were cast."""
    n = 0
    for module in encoder.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None and not module.bias.requires_grad:
                module.bias.data = module.bias.data.to(dtype)
            n += 1
    return n


def run_relative(name: str) -> str:
    """A trainable parameter's name without the run's slot in the group ("tasks.run3.methods.lora..." ->
    "methods.lora..."): a checkpoint must load into whatever slot the run has when it resumes, and a re-planned
    group (its finished runs left out) gives it another one."""
    return name.split(".", 2)[2] if name.startswith("tasks.") else name


class GroupTrainer:
    def __init__(self, model: PeltModel, runs: list[GroupRun], pad_id: int, max_length: int, device,
                 mixed_precision: str = "no", progress: bool = True, cast_frozen: bool = True,
                 eval_rows: int = EVAL_ROWS, slots: int | None = None, admit=None, release=None,
                 cuda_graph: bool = False, graph_bucket: int | None = None, activations: str = "fp32",
                 attention_dropout: str = "per_run") -> None:
        """`slots`: runs trained at once (None: all); the rest wait and take the slots of runs that stop.
        `admit(run)` is called before a run starts (the runner adds its task to the model there; without it every
        run must already be a task of the model); `release(run)` once a stopped run has left the group (its
        on_finished call is done) and its task is no longer needed.
        `cuda_graph`: training steps padded to `graph_bucket`-token widths (default DEFAULT_GRAPH_BUCKET) and, on a
        GPU, each (live runs, shape) captured once as a CUDA graph and replayed (graphs.py); on a CPU the same
        static-buffer step runs without capture.
        `activations`: "bf16" keeps the hidden states in bf16 between layers (activations.py; needs bf16).
        `attention_dropout`: "fused" computes the training attention in one SDPA kernel whose dropout masks come from
        the default generator, seeded at each round from the first run's seed and the round number (attention.py;
        default "per_run": each run's masks from its own stream)."""
        if mixed_precision not in ("no", "bf16"):
            raise ValueError(f"grouped training supports train.mixed_precision no or bf16, got {mixed_precision!r}")
        check_activations(activations, mixed_precision)  # the model's state carries it (use_bf16_stream)
        self.attention_dropout = check_attention_dropout(attention_dropout)
        self._rounds = 0  # rounds trained by this trainer (the fused attention dropout's seed)
        if slots is not None and (not isinstance(slots, int) or slots < 1):
            raise ValueError(f"slots must be a positive integer or None, got {slots!r}")
        self.model = model
        self.all_runs = list(runs)
        self.slots = len(runs) if slots is None else min(slots, len(runs))
        self.waiting = list(runs[self.slots:])
        self.runs = list(runs[:self.slots])
        self.admit, self.release = admit, release
        self.pad_id = pad_id
        self.max_length = max_length
        self.device = torch.device(device)
        self.mixed_precision = mixed_precision
        self.progress = progress
        self.eval_rows_cap = eval_rows
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be true or false, got {cuda_graph!r}")
        if graph_bucket is not None and (not isinstance(graph_bucket, int) or graph_bucket < 1):
            raise ValueError(f"graph_bucket must be a positive integer or None, got {graph_bucket!r}")
        self.graph_bucket = (graph_bucket or DEFAULT_GRAPH_BUCKET) if cuda_graph else None
        self.step_graphs = GroupStepGraphs(self.device, torch.bfloat16 if mixed_precision == "bf16" else None) \
            if cuda_graph else None
        self._reported: set[str] = set()  # runs already passed to on_finished
        self.step_losses: dict[str, list[float]] | None = None  # set to {} to record every step's loss (tests)
        for run in self.runs:
            if admit is not None:
                admit(run)
        self._form()
        if activations == "bf16":  # the whole frozen encoder in bf16, its linears included
            use_bf16_stream(model)
        elif cast_frozen and mixed_precision == "bf16":  # exact (cast_frozen_linears); cast_frozen=False: tests
            cast_frozen_linears(model.encoder, torch.bfloat16)

    def _form(self) -> None:
        """The engine and row banks of the current members (`self.runs`, in slot order)."""
        for i, run in enumerate(self.runs):
            run.index = i
        self.engine = GroupEngine(self.model, [r.name for r in self.runs], self.max_length, self.attention_dropout)
        self.train_bank = RowBank([r.train for r in self.runs], self.pad_id, self.device, self.graph_bucket,
                                  self.max_length)
        if self.step_graphs is not None:
            self.step_graphs.reset()  # a new engine: new stacks, so no captured step applies any more
        self.dev_bank = RowBank([r.dev for r in self.runs], self.pad_id, self.device)
        self._eval_plans: dict[tuple, tuple] = {}  # see _eval_plan

    # --- helpers ------------------------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision == "bf16")

    def _trainable(self, run: GroupRun) -> dict[str, torch.nn.Parameter]:
        return self.model.trainable_named_parameters(run.name)

    def _snapshot(self, run: GroupRun) -> dict[str, torch.Tensor]:
        return {run_relative(k): p.detach().clone() for k, p in self._trainable(run).items()}

    def _load_trainable(self, run: GroupRun, tensors: dict) -> None:
        saved = {run_relative(k): v for k, v in tensors.items()}
        with torch.no_grad():
            for k, p in self._trainable(run).items():
                p.copy_(saved[run_relative(k)].to(p.device, p.dtype))

    def _optimizer(self, run: GroupRun, steps_per_epoch: int):
        from transformers import get_linear_schedule_with_warmup

        s = run.settings
        params = list(self._trainable(run).values())
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, fused=fused or None)
        total = s.epochs * steps_per_epoch if s.max_steps is None else min(s.max_steps, s.epochs * steps_per_epoch)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(s.warmup_ratio * total), max(total, 1))
        return optimizer, scheduler

    # --- evaluation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, runs: list[GroupRun], bank: RowBank, offsets: list[int], sizes: list[int], num_labels: int,
                gate_stats: bool = False):
        """Predictions of each run on its own split (rows `offsets[i]` .. + `sizes[i]` of `bank`), in the split's
        order; runs go through the encoder together, the same number of rows each (`eval_chunks`), sorted by length
        like a run alone.
        Logits stay on the device until the end (one copy to the host, no sync per batch), and the parameters'
        stacks are built once for the whole pass (GroupEngine.frozen_parameters)."""
        self.model.eval()
        orders, spans = self._eval_plan(runs, bank, offsets, sizes)
        sums: list[dict] = [{} for _ in runs]
        names = [r.name for r in runs]
        pieces = []  # (logits on the device, chunks, width)
        with self.engine.frozen_parameters():
            for start, stop in spans:
                chunks = [order[start:stop] for order in orders]
                width = max(len(c) for c in chunks)
                rows, valid = [], []
                for o, chunk, order in zip(offsets, chunks, orders):
                    filler = chunk[:1] or order[:1]
                    rows += [o + i for i in chunk] + [o + filler[0]] * (width - len(chunk))
                    valid.append(len(chunk))
                batch = bank.batch(rows)
                batch.pop("labels")
                with self.autocast():
                    logits = self.engine.forward(names, **batch, collect_gates=gate_stats).float()
                pieces.append((logits, chunks, width))
                if gate_stats:
                    self._add_gate_sums(sums, runs, valid, width)
        host = torch.cat([p[0] for p in pieces]).cpu() if pieces else torch.empty(0, num_labels)
        outputs = [torch.empty(n, num_labels) for n in sizes]
        at = 0
        for logits, chunks, width in pieces:
            block = host[at:at + logits.shape[0]]
            at += logits.shape[0]
            for r, chunk in enumerate(chunks):
                if chunk:
                    outputs[r][torch.tensor(chunk)] = block[r * width:r * width + len(chunk)]
        preds = []
        for out in outputs:
            preds.append(out.squeeze(-1).numpy() if num_labels == 1 else out.argmax(-1).numpy())
        gates = [{k: (v.cpu() / n).tolist() for k, v in s.items()} for s, n in zip(sums, sizes)]
        return preds, gates

    def _add_gate_sums(self, sums: list[dict], runs: list[GroupRun], valid: list[int], width: int) -> None:
        """Add each run's per-layer gate sums of the last forward (only the gate kinds the run has), on the device."""
        for kind, per_layer in self.engine.gate_log.items():
            if any(g is None for g in per_layer):
                continue
            values = torch.stack([g.float() for g in per_layer]).view(len(per_layer), len(runs), width)
            for r, (run, n) in enumerate(zip(runs, valid)):
                if n and kind in self._gate_kinds(run):
                    sums[r][kind] = sums[r].get(kind, 0) + values[:, r, :n].sum(-1)

    def _gate_kinds(self, run: GroupRun) -> set:
        return {k for m in self.model.tasks[run.name].methods.values() for k in m.gates()}

    def _eval_plan(self, runs: list[GroupRun], bank: RowBank, offsets: list[int], sizes: list[int]) -> tuple:
        """Each run's rows sorted by length and the (start, stop) spans of its forwards. The dev splits never change
        and every epoch evaluates them, so their plan is made once per set of runs."""
        key = tuple(r.name for r in runs) if bank is self.dev_bank else None
        if key in self._eval_plans:
            return self._eval_plans[key]
        orders = [sorted(range(n), key=lambda i, o=o: bank.lengths[o + i]) for o, n in zip(offsets, sizes)]
        plan = (orders, self.eval_chunks(runs, bank, offsets, orders))
        if key is not None:
            self._eval_plans[key] = plan
        return plan

    def eval_chunks(self, runs: list[GroupRun], bank: RowBank, offsets: list[int], orders: list[list[int]]) -> list:
        """(start, stop) positions in the runs' length-sorted orders, one pair per evaluation forward. A forward holds
        as many rows per run as fit a token budget of `eval_rows` rows at the full max length (group.eval_rows:
        the memory of the old fixed cap, whatever the lengths) and at most the runs' eval batch size: short rows
        (most of SST-2 and CoLA) go many more to a forward, so far fewer forwards, each bigger. Rows are independent,
        so results do not depend on the chunking."""
        R, n = len(orders), max(len(o) for o in orders)
        lengths = np.zeros((R, n), dtype=np.int64)
        for r, (o, order) in enumerate(zip(offsets, orders)):
            lengths[r, :len(order)] = [bank.lengths[o + i] for i in order]
        widest = lengths.max(0)  # per sorted position, over the runs
        budget = self.eval_rows_cap * self.engine.max_length
        cap = max(1, runs[0].settings.eval_batch_size)
        out, start = [], 0
        while start < n:
            width = np.maximum.accumulate(widest[start:start + cap])  # the forward's width with 1, 2, ... rows per run
            fits = R * np.arange(1, len(width) + 1) * width <= budget
            rows = max(1, int(fits.sum()) if fits.all() else int(np.argmin(fits)))
            out.append((start, start + rows))
            start += rows
        return out

    def evaluate_dev(self, runs: list[GroupRun]) -> list[dict]:
        index = {r.name: i for i, r in enumerate(self.runs)}
        offsets = [self.dev_bank.offsets[index[r.name]] for r in runs]
        preds, _ = self.predict(runs, self.dev_bank, offsets, [len(r.dev) for r in runs],
                                runs[0].spec.num_labels)
        return [compute_metrics(r.spec, p, r.dev.labels.numpy()) for r, p in zip(runs, preds)]

    def evaluate_shared(self, runs: list[GroupRun], data: Encoded, split: str | None = None,
                        gate_stats: bool = False):
        """Every run of `runs` on the same split (the GLUE test set): metrics and mean gates per run."""
        bank = RowBank([data], self.pad_id, self.device)
        preds, gates = self.predict(runs, bank, [0] * len(runs), [len(data)] * len(runs),
                                    runs[0].spec.num_labels, gate_stats)
        metrics = [compute_metrics(r.spec, p, data.labels.numpy(), split=split) for r, p in zip(runs, preds)]
        return metrics, gates

    # --- training ----------------------------------------------------------------------------------------------
    def fit(self, on_finished=None) -> None:
        """Train until every run has stopped. `on_finished(runs)` is called after each round with the runs that
        stopped in it (best state loaded, `run.result` set), so their test evaluation and records can be written
        while the others train on. Diverged runs get status 'failed' and `run.failure` (a TrainingDiverged).
        Waiting runs take the free slots after each round (`_refill`)."""
        with deterministic_algorithms(self.all_runs[0].settings.deterministic):  # one value per group (group_key)
            self._fit(on_finished)

    def _fit(self, on_finished) -> None:
        self._start()
        bar = tqdm(total=len(self.all_runs), desc=f"group of {len(self.all_runs)}", disable=not self.progress,
                   leave=False)
        self._settle(self.runs, on_finished, bar)
        while True:
            live = [r for r in self.runs if r.status == "live"]
            if self.waiting and len(live) < self.slots:
                self._refill(on_finished, bar)
                continue
            if not live:
                break
            self._round(live)
            self._settle(live, on_finished, bar)
        bar.close()

    def _settle(self, runs: list[GroupRun], on_finished, bar) -> None:
        """Finish the runs of `runs` that are done, and report every stopped run (done or failed) once."""
        for run in runs:
            if run.status == "live" and self._done(run):
                self._finish(run)
        stopped = [r for r in runs if r.status != "live" and r.name not in self._reported]
        self._reported.update(r.name for r in stopped)
        bar.update(len(stopped))
        if stopped and on_finished:
            on_finished(stopped)

    def _refill(self, on_finished, bar) -> None:
        """Re-form the group: the stopped runs leave, the next waiting runs take their slots. The live runs' AdamW
        moments go to their optimizers (as for a checkpoint) and come back into the new group's stacks, and their
        parameters keep their values, so they train on exactly as before."""
        live = [r for r in self.runs if r.status == "live"]
        new = self.waiting[:self.slots - len(live)]
        del self.waiting[:len(new)]
        for run in live:
            self.stacked_adam.export_to(run.index)
            run.adam_cache = None
        self.engine.close()
        for run in self.runs:
            if run.status != "live":
                run.best_state = run.optimizer = run.scheduler = run.adam_cache = None
                if self.release is not None:
                    self.release(run)
        for run in new:
            if self.admit is not None:
                self.admit(run)
        self.runs = live + new
        self._form()
        for run in new:
            self._start_run(run)
        self.stacked_adam = StackedAdamW(self.engine.stacks, [r.optimizer for r in self.runs])
        log.info("group re-formed: %d runs on, %d joined, %d waiting", len(live), len(new), len(self.waiting))
        self._settle(new, on_finished, bar)  # a waiting run whose checkpoint is already its last epoch

    def _start(self) -> None:
        for run in self.runs:
            self._start_run(run)
        self.stacked_adam = StackedAdamW(self.engine.stacks, [r.optimizer for r in self.runs])

    def _start_run(self, run: GroupRun) -> None:
        """A run's optimizer, schedule, noise stream and progress: fresh, or from its checkpoint."""
        s = run.settings
        n = len(run.train)
        steps_per_epoch = math.ceil(n / s.batch_size)
        run.optimizer, run.scheduler = self._optimizer(run, steps_per_epoch)
        run.adam_cache = None
        run.checkpoints = Checkpointer(run.run_dir / "checkpoint", run.config)
        run.noise = RunNoise(s.seed, self.device)
        progress = {"step": 0, "best_score": None, "best_epoch": 0, "bad_epochs": 0, "history": [],
                    "train_time": 0.0, "eval_time": 0.0, "dev_metrics": {}}
        start_epoch = 1
        if not run.checkpoints.exists():
            (run.run_dir / "log.csv").unlink(missing_ok=True)
        else:
            state = run.checkpoints.load()
            self._load_trainable(run, state["trainable"])
            load_optimizer_state(run.optimizer, run.scheduler, state["optimizer_state"], state["scheduler"])
            run.best_state = state["best"]
            progress = {k: state.get(k, progress[k]) for k in progress}
            start_epoch = state["epoch"] + 1
            log.info("resuming %s from epoch %d (step %d)", run.run_dir.name, state["epoch"], progress["step"])
            write_log(run.run_dir, progress["history"])
        progress["resumed_from_epoch"] = start_epoch - 1
        progress["epoch"] = start_epoch - 1
        run.state = progress
        run.tracker = RunTracker(s.log_with, run.run_dir, run.run_dir.name, run.config)
        run.last_checkpoint = time.perf_counter()
        run.best_unsaved = False

    def _done(self, run: GroupRun) -> bool:
        s, p = run.settings, run.state
        if p["epoch"] >= s.epochs or p["bad_epochs"] >= s.patience:
            return True
        return s.max_steps is not None and p["step"] >= s.max_steps

    def _round(self, live: list[GroupRun]) -> None:
        """One epoch of every live run (each at its own epoch number), then a dev evaluation of each."""
        t0 = time.perf_counter()
        self.model.train()
        self._rounds += 1
        if self.attention_dropout == "fused":  # a fresh, reproducible stream per round (runs joining re-seed torch)
            torch.manual_seed(self.all_runs[0].settings.seed * 1_000_003 + self._rounds)
        chunks = {}
        for run in live:
            epoch = run.state["epoch"] + 1
            run.state["epoch"] = epoch
            run.noise.reseed(epoch)
            order = epoch_order(len(run.train), run.settings.seed, epoch)
            bs = run.settings.batch_size
            chunks[run.name] = [order[i:i + bs] for i in range(0, len(order), bs)]
        R_all = len(live)
        running = torch.zeros(R_all, device=self.device)
        counts = [0] * R_all
        first_bad = torch.full((R_all,), -1, dtype=torch.long, device=self.device)
        steps = max(len(c) for c in chunks.values())
        check_every = min(r.settings.check_every for r in live)
        for j in range(steps):
            active = [i for i, r in enumerate(live)
                      if r.status == "live" and j < len(chunks[r.name]) and not self._max_steps_hit(r)]
            if not active:
                break
            runs = [live[i] for i in active]
            width = max(len(chunks[r.name][j]) for r in runs)
            rows, valid_rows = [], []
            for r in runs:
                chunk = chunks[r.name][j]
                base = self.train_bank.offsets[r.index]
                rows += [base + i for i in chunk] + [base + chunk[0]] * (width - len(chunk))
                valid_rows.append(len(chunk))
            batch = self.train_bank.batch(rows)
            labels = batch.pop("labels")
            valid = None
            if any(n < width for n in valid_rows):
                valid = to_device([k < n for n in valid_rows for k in range(width)], torch.bool, self.device)
            has_prefix = ["prefix" in self.model.tasks[r.name].methods for r in runs]
            nan_hits = self._nan_hits(runs)
            if self.step_graphs is not None:
                raw, losses = self.step_graphs.step(self, runs, batch, labels, valid, valid_rows, has_prefix,
                                                    self._nan_factor(nan_hits))
                self.step_optimizers(runs, stacked=False)  # the stacks' update is part of the graphed step
            else:
                raw, losses = self._eager_step(runs, batch, labels, valid, valid_rows, has_prefix, width, nan_hits)
            for r in runs:
                r.state["step"] += 1
            if self.step_losses is not None:
                for r, value in zip(runs, raw.tolist()):
                    self.step_losses.setdefault(r.name, []).append(value)
            index = to_device(active, torch.long, self.device)
            detached = losses.detach().float()
            running.index_add_(0, index, detached)
            step_no = to_device([r.state["step"] for r in runs], torch.long, self.device)
            bad = ~torch.isfinite(detached)
            current = first_bad.index_select(0, index)
            first_bad.index_copy_(0, index, torch.where(bad & (current < 0), step_no, current))
            for i in active:
                counts[i] += 1
            if (j + 1) % check_every == 0:
                self._check_finite(live, first_bad)
        self._check_finite(live, first_bad)
        epoch_time = time.perf_counter() - t0
        survivors = [r for r in live if r.status == "live"]
        means = (running / torch.tensor([max(c, 1) for c in counts], device=self.device)).tolist()
        if not survivors:
            return
        t_eval = time.perf_counter()
        dev_metrics = self.evaluate_dev(survivors)
        eval_share = (time.perf_counter() - t_eval) / len(survivors)
        for run, metrics in zip(survivors, dev_metrics):
            run.state["eval_time"] += eval_share
            self._end_epoch(run, means[live.index(run)], metrics, epoch_time)

    def _eager_step(self, runs: list[GroupRun], batch: dict, labels: torch.Tensor, valid: torch.Tensor | None,
                    valid_rows: list[int], has_prefix: list[bool], width: int,
                    nan_hits: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step of `runs`, op by op: (losses, losses after NaN injection), (R,) each."""
        noise = NoiseBatch(self.engine.noise_layout, [r.noise for r in runs], valid_rows, has_prefix, width,
                           self.device)
        with self.autocast():
            logits = self.engine.forward([r.name for r in runs], **batch, noise=noise)
        raw = self.engine.losses(logits, labels, valid)
        losses = raw * self._nan_factor(nan_hits) if any(nan_hits) else raw
        for r in runs:
            r.optimizer.zero_grad(set_to_none=True)
        self.stacked_adam.zero_grad()
        losses.sum().backward()
        self.step_optimizers(runs)
        return raw, losses

    def step_optimizers(self, runs: list[GroupRun], stacked: bool = True) -> None:
        """Each run's AdamW step, then its schedule. The stacked parameters (most of them) are updated stack by stack
        (StackedAdamW, each row with its run's hyper-parameters; `stacked=False`: already done, by a graphed step).
        The rest (e.g. folded prefixes, read by each run's own forward) of runs whose hyper-parameters agree at this
        step (same LR, weight decay, betas...) are stepped by one call of torch's Adam functional over all their
        tensors: the arithmetic is per tensor (each with its own step count and moments), so every run gets exactly
        its own optimizer's update."""
        if stacked:
            self.stacked_adam.step([r.index for r in runs])
        buckets: dict[tuple, list[list]] = {}
        for run in runs:
            opt = run.optimizer
            group = opt.param_groups[0]
            if len(opt.param_groups) != 1 or torch.is_tensor(group["lr"]) or "decoupled_weight_decay" not in group:
                opt.step()  # not the layout bucketing assumes: the optimizer's own step
                continue
            lists, has_complex = self._adam_lists(run, group)
            opt._opt_called = True  # what Optimizer.step's wrapper records (the LR scheduler checks it)
            if not lists[0]:
                continue  # every parameter of the run is stacked
            if not stacked:
                raise RuntimeError(f"group.cuda_graph: run {run.name!r} has gradients outside the group's parameter "
                                   f"stacks, which a graphed step does not update; train it with "
                                   f"group.cuda_graph=false")
            key = (group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"], group["amsgrad"],
                   group["maximize"], group["foreach"], group["capturable"], group["differentiable"], group["fused"],
                   group["decoupled_weight_decay"], has_complex)
            bucket = buckets.setdefault(key, [[], [], [], [], [], []])
            for into, items in zip(bucket, lists):
                into.extend(items)
        for key, lists in buckets.items():
            (lr, weight_decay, (beta1, beta2), eps, amsgrad, maximize, foreach, capturable, differentiable, fused,
             decoupled, has_complex) = key
            with torch.no_grad():  # as Optimizer.step runs it
                adam_functional(*lists, amsgrad=amsgrad, has_complex=has_complex, beta1=beta1, beta2=beta2, lr=lr,
                                weight_decay=weight_decay, eps=eps, maximize=maximize, foreach=foreach,
                                capturable=capturable, differentiable=differentiable, fused=fused,
                                decoupled_weight_decay=decoupled)
        for run in runs:
            run.scheduler.step()

    def _adam_lists(self, run: GroupRun, group: dict) -> tuple[list[list], bool]:
        """The six tensor lists torch's Adam functional takes for this run's unstacked parameters. The first step
        gathers them with the optimizer's own `_init_group` (which also creates the state); later steps reuse the
        gathered parameters, moments and step counters (same tensors, updated in place) and only collect the new
        gradients, which saves the per-parameter Python of `_init_group` for every run at every step."""
        cached = getattr(run, "adam_cache", None)
        if cached is not None:
            params, exp_avgs, exp_avg_sqs, max_sqs, steps, has_complex = cached
            grads = [p.grad for p in params]
            if all(g is not None for g in grads):
                return [params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps], has_complex
        lists: list[list] = [[], [], [], [], [], []]
        has_complex = run.optimizer._init_group(group, *lists)  # the optimizer's own lazy state set-up and gathering
        whole = len(lists[0]) == sum(not self.engine.stacks.holds(p) for p in group["params"])
        run.adam_cache = (lists[0], lists[2], lists[3], lists[4], lists[5], has_complex) if whole else None
        return lists, has_complex

    def _max_steps_hit(self, run: GroupRun) -> bool:
        return run.settings.max_steps is not None and run.state["step"] >= run.settings.max_steps

    @staticmethod
    def _nan_hits(runs: list[GroupRun]) -> list[bool]:
        """Fault injection for tests: whether each run's loss turns NaN at the coming step (steps not counted yet),
        from its `inject_nan_at_step` on."""
        return [r.settings.inject_nan_at_step is not None and r.state["step"] + 1 >= r.settings.inject_nan_at_step
                for r in runs]

    def _nan_factor(self, hits: list[bool]) -> torch.Tensor:
        """(R,) loss factors: NaN where `hits`, else 1.0."""
        return to_device([float("nan") if h else 1.0 for h in hits], torch.float32, self.device)

    def _check_finite(self, live: list[GroupRun], first_bad: torch.Tensor) -> None:
        bad = first_bad.tolist()
        for run, step in zip(live, bad):
            if step >= 0 and run.status == "live":
                run.status = "failed"
                run.failure = TrainingDiverged(step, run.state["epoch"])
                log.warning("%s: %s", run.run_dir.name, run.failure)

    def _end_epoch(self, run: GroupRun, loss: float, metrics: dict, epoch_time: float) -> None:
        p, s = run.state, run.settings
        epoch = p["epoch"]
        p["train_time"] += epoch_time
        score = main_score(run.spec, metrics)
        improved = p["best_score"] is None or score > p["best_score"]
        if improved:
            p.update(best_score=score, best_epoch=epoch, bad_epochs=0, dev_metrics=metrics)
            run.best_state = self._snapshot(run)
        else:
            p["bad_epochs"] += 1
        p["history"].append({"epoch": epoch, "step": p["step"], "train_loss": loss, "dev_score": score,
                             "lr": float(run.scheduler.get_last_lr()[0]), "epoch_s": round(epoch_time, 3)})
        run.best_unsaved |= improved
        run.tracker.log({k: p["history"][-1][k] for k in ("train_loss", "dev_score", "lr", "epoch")}, step=p["step"])
        if time.perf_counter() - run.last_checkpoint >= s.checkpoint_every_s and not self._done(run):
            saved = {k: v for k, v in p.items() if k not in ("epoch", "resumed_from_epoch")}
            self.stacked_adam.export_to(run.index)
            run.checkpoints.save(epoch, self._snapshot(run), run.best_state if run.best_unsaved else None,
                                 run.optimizer, run.scheduler, saved)
            run.last_checkpoint, run.best_unsaved = time.perf_counter(), False
        write_log(run.run_dir, p["history"])

    def _finish(self, run: GroupRun) -> None:
        p = run.state
        if run.best_state is not None:
            self._load_trainable(run, run.best_state)
        epochs_run = len(p["history"])
        run.result = FitResult(
            best_epoch=p["best_epoch"], epochs_run=epochs_run, steps=p["step"], dev_metrics=p["dev_metrics"],
            history=p["history"], train_s=p["train_time"], train_step_s=p["train_time"] / max(p["step"], 1),
            train_epoch_s=p["train_time"] / max(epochs_run, 1), resumed_from_epoch=p["resumed_from_epoch"])
        run.status = "done"
        run.tracker.close()

    def close(self) -> None:
        for run in self.all_runs:
            tracker = getattr(run, "tracker", None)
            if tracker is not None:
                tracker.close()
        self.engine.close()
