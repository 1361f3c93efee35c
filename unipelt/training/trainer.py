"""The training loop: AdamW + linear warm-up/decay, one dev evaluation per epoch, early stopping on the task's
model-selection metric, the best trainable state kept, resumable from the last completed epoch."""
from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass, field, fields, replace

import torch
from tqdm.auto import tqdm

from ..data import TaskSpec
from ..io import atomic_write_text
from ..metrics import compute_metrics, main_score
from ..model import PeltModel
from .batching import Encoded, batches, epoch_order
from .checkpoint import Checkpointer, load_optimizer_state
from .determinism import deterministic_algorithms
from .cuda_graph import DEFAULT_GRAPH_BUCKET, GraphedForward, GraphedTrainStep, capturable_adamw
from .tracking import RunTracker, check_log_with

log = logging.getLogger("unipelt.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; `step` is the first bad optimizer step (1-based)."""

    def __init__(self, step: int, epoch: int) -> None:
        super().__init__(f"loss is not finite (NaN/inf) at step {step} (epoch {epoch}); the run is marked failed")
        self.step, self.epoch = step, epoch


@dataclass
class TrainSettings:
    epochs: int = 50
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    patience: int = 10
    seed: int = 42
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    bucket: bool = False  # length-bucketed training batches (less padding)
    compile: bool | str = False  # torch.compile the model for training: true (inductor) or a backend name; with
    # cuda_graph the compiled forward + backward + optimizer step is captured as one graph (the fastest step)
    cuda_graph: bool | str = False  # capture each training step as one CUDA graph (fixed-shape batches;
    # cuda_graph.py); "auto" (the config's default): on where it applies (resolve_auto_graph), with 16-token buckets
    graph_bucket: int | None = None  # with cuda_graph: pad each batch to the next multiple of this many tokens
    # (at most the data's max length) and keep one graph per width; null: every batch padded to one width
    max_steps: int | None = None  # stop after this many steps in total (smoke tests)
    check_every: int = 25  # steps between NaN checks (each check is one host sync)
    checkpoint_every_s: float = 0  # 0: checkpoint after every epoch; N: at most once per N seconds (sweeps of
    # short runs: a resumed run still continues bit-identically, from the last checkpoint written)
    inject_nan_at_step: int | None = None  # fault injection for tests: the loss becomes NaN at this step
    log_with: str | None = None  # experiment tracker: tensorboard | wandb | mlflow (tracking.py); log.csv always
    deterministic: bool = False  # torch's deterministic kernels while training (determinism.py): on CUDA the
    # attention backward of the per-run trainer is otherwise not bit-reproducible from one training to the next

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "patience", "check_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
        if not (_is_number(self.lr) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"train.lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"train.seed must be a non-negative integer, got {self.seed!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision {self.mixed_precision!r} is not one of: no, bf16, fp16")
        if not (_is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not (_is_number(self.weight_decay) and 0 <= self.weight_decay and math.isfinite(self.weight_decay)):
            raise ValueError(f"train.weight_decay must be a non-negative number, got {self.weight_decay!r}")
        if not isinstance(self.compile, (bool, str)):
            raise ValueError(f"train.compile must be true, false or a torch.compile backend name, got {self.compile!r}")
        for name in ("bucket", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"train.{name} must be true or false, got {getattr(self, name)!r}")
        if not (isinstance(self.cuda_graph, bool) or self.cuda_graph == "auto"):
            raise ValueError(f"train.cuda_graph must be true, false or auto, got {self.cuda_graph!r}")
        if self.graph_bucket is not None:
            if not isinstance(self.graph_bucket, int) or isinstance(self.graph_bucket, bool) or self.graph_bucket < 1:
                raise ValueError(f"train.graph_bucket must be a positive number of tokens or null, got "
                                 f"{self.graph_bucket!r}")
            if self.cuda_graph is False:
                raise ValueError(f"train.graph_bucket={self.graph_bucket} pads batches for CUDA graphs and needs "
                                 f"train.cuda_graph=true or auto; set one of those or train.graph_bucket=null")
        if not (_is_number(self.checkpoint_every_s) and 0 <= self.checkpoint_every_s < math.inf):
            raise ValueError(f"train.checkpoint_every_s must be a number of seconds >= 0, got {self.checkpoint_every_s!r}")
        for name in ("max_steps", "inject_nan_at_step"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"train.{name} must be a positive integer or null, got {value!r}")
        check_log_with(self.log_with, need_package=False)  # the package is checked when a run is planned
        if self.cuda_graph is True:
            self._check_cuda_graph()

    def resolve_auto_graph(self, per_run_on_one_gpu: bool) -> "TrainSettings":
        """train.cuda_graph=auto made definite: graphs on when the per-run trainer trains the run on one CUDA GPU
        (`per_run_on_one_gpu`) and no setting rules them out (fp16's GradScaler, fault injection, a compile backend
        that captures graphs itself), then with one graph per `graph_bucket`-token width (default 16, so short
        sentences are not padded to the max length). Off everywhere else: on CPU, in the grouped engine, under
        several processes. The resolved value is what the run's record states."""
        if self.cuda_graph != "auto":
            return self
        on = (per_run_on_one_gpu and self.mixed_precision != "fp16" and self.inject_nan_at_step is None
              and self.compile != "cudagraphs")
        return replace(self, cuda_graph=on, graph_bucket=(self.graph_bucket or DEFAULT_GRAPH_BUCKET) if on else None)

    def _check_cuda_graph(self) -> None:
        """Settings a captured step cannot honour are refused rather than silently ignored."""
        if self.mixed_precision == "fp16":
            raise ValueError("train.cuda_graph=true does not work with train.mixed_precision=fp16 (fp16 needs a "
                             "GradScaler, whose inf checks and skipped steps cannot be captured); use "
                             "train.mixed_precision=bf16 or no")
        if self.inject_nan_at_step is not None:
            raise ValueError(f"train.cuda_graph=true does not work with train.inject_nan_at_step="
                             f"{self.inject_nan_at_step} (the fault is injected between forward and backward, inside "
                             f"the captured step); set train.inject_nan_at_step=null or train.cuda_graph=false")
        if self.compile == "cudagraphs":
            raise ValueError("train.cuda_graph=true with train.compile='cudagraphs' would capture a CUDA graph inside "
                             "another; use train.compile=true (inductor: fused kernels, then captured whole by "
                             "train.cuda_graph) or train.cuda_graph=false")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainSettings":
        """Build from the `train` config section; unknown keys are an error naming the allowed ones."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"unknown train option(s) {unknown}; allowed: {', '.join(allowed)}")
        return cls(**data)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class FitResult:
    best_epoch: int
    epochs_run: int
    steps: int
    dev_metrics: dict
    history: list = field(default_factory=list)
    train_s: float = 0.0
    train_step_s: float = 0.0
    train_epoch_s: float = 0.0
    resumed_from_epoch: int = 0


class Trainer:
    def __init__(self, model: PeltModel, spec: TaskSpec, train: Encoded, dev: Encoded, settings: TrainSettings,
                 pad_id: int, run_dir, accelerator=None, progress: bool = True, config: dict | None = None,
                 pad_to: int | None = None) -> None:
        """`config`: the run's resolved config, stored in each checkpoint; a checkpoint written under other
        result-relevant settings is refused rather than resumed (see checkpoint.Checkpointer).
        `pad_to`: the fixed width of training batches under `train.cuda_graph` (the data's max length; by default
        the longest training example). A graph replays one shape only, so every full batch must have it."""
        from accelerate import Accelerator

        self.raw = model
        self.spec = spec
        self.train_data, self.dev_data = train, dev
        self.pad_id = pad_id
        self.pad_to = pad_to
        self.run_dir = run_dir
        self.accelerator = accelerator or Accelerator(mixed_precision=settings.mixed_precision)
        acc = self.accelerator  # train.cuda_graph=auto (unplanned settings): decided here by the device
        self.settings = settings.resolve_auto_graph(acc.device.type == "cuda" and acc.num_processes == 1)
        self.progress = progress
        self.checkpoints = Checkpointer(run_dir / "checkpoint", config)
        self.config = config
        self.best_state: dict | None = None
        self._eval_graphs: dict[int, tuple] = {}  # id(split) -> (split, GraphedForward): see _graphed_eval
        # Live training state (read by the runner to describe a failure): step, epoch, history, ...
        self.state: dict = {"step": 0, "epoch": 0, "history": [], "resumed_from_epoch": 0}

    # --- helpers --------------------------------------------------------------------------------------------
    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return self.raw.trainable_named_parameters()

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self._trainable().items()}

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self._trainable().items():
                p.copy_(tensors[k].to(p.device, p.dtype))

    def _build_optimizer(self, steps_per_epoch: int):
        from transformers import get_linear_schedule_with_warmup

        s = self.settings
        params = list(self._trainable().values())
        device = self.accelerator.device
        if s.cuda_graph:  # LR in a tensor that the captured step reads; the scheduler fills it in place
            optimizer = capturable_adamw(params, s.lr, s.weight_decay, device)
        else:
            fused = device.type == "cuda"  # one kernel for all parameters instead of several per tensor
            optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, fused=fused or None)
        total = s.epochs * steps_per_epoch if s.max_steps is None else min(s.max_steps, s.epochs * steps_per_epoch)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(s.warmup_ratio * total), max(total, 1))
        return optimizer, scheduler

    # --- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, data: Encoded, gate_stats: bool = False):
        """Predictions in the original order (and mean gate value per layer per submodule if asked). Under
        train.cuda_graph the forwards (not the gate statistics) replay one graph per bucket width."""
        from ..inference import logits_in_order

        model = self.raw
        model.eval()
        device = self.accelerator.device
        sums: dict[str, torch.Tensor] = {}
        graphed = None if gate_stats else self._graphed_eval(data)

        def forward(batch):
            if graphed is not None:
                return graphed(batch)
            with self.accelerator.autocast():
                logits = model(**batch).logits
            if gate_stats:
                for name, per_layer in model.gate_values().items():
                    sums[name] = sums.get(name, 0) + torch.stack([g.float().sum() for g in per_layer])
            return logits

        bucket = (self.settings.graph_bucket or DEFAULT_GRAPH_BUCKET) if graphed is not None else None
        outputs = logits_in_order(forward, data, self.settings.eval_batch_size, self.pad_id, device, bucket)
        preds = outputs.squeeze(-1).numpy() if self.spec.is_regression else outputs.argmax(-1).numpy()
        gates = {name: (s.cpu() / len(data)).tolist() for name, s in sums.items()}
        return preds, gates

    def _graphed_eval(self, data: Encoded) -> GraphedForward | None:
        """One GraphedForward per split and fit under train.cuda_graph (its graphs read the live weights)."""
        from ..inference import graphed_logits

        s = self.settings
        if not s.cuda_graph or self.accelerator.num_processes > 1:
            return None
        graphs = self._eval_graphs
        if id(data) not in graphs:
            dtype = torch.bfloat16 if s.mixed_precision == "bf16" else None
            graphs[id(data)] = (data, graphed_logits(self.raw, data, self.accelerator.device, dtype,
                                                     s.graph_bucket or DEFAULT_GRAPH_BUCKET))
        return graphs[id(data)][1]

    def evaluate(self, data: Encoded, split: str | None = None, gate_stats: bool = False):
        preds, gates = self.predict(data, gate_stats)
        metrics = compute_metrics(self.spec, preds, data.labels.numpy(), split=split)
        return metrics, gates

    # --- training -------------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        main = self.accelerator.is_main_process  # one tracker run per training run, on the main process
        tracker = RunTracker(self.settings.log_with if main else None, self.run_dir, self.run_dir.name, self.config)
        try:
            with deterministic_algorithms(self.settings.deterministic):
                return self._fit(tracker)
        finally:
            tracker.close()

    def _fit(self, tracker: RunTracker) -> FitResult:
        s = self.settings
        acc = self.accelerator
        if s.cuda_graph and acc.num_processes > 1:
            raise ValueError(f"train.cuda_graph=true supports one process only, got {acc.num_processes} (DDP's "
                             f"gradient all-reduce is not captured); run single-process or set train.cuda_graph=false")
        shard = (acc.process_index, acc.num_processes)
        n_local = len(epoch_order(len(self.train_data), s.seed, 0, shard))
        steps_per_epoch = math.ceil(n_local / s.batch_size)
        optimizer, scheduler = self._build_optimizer(steps_per_epoch)
        model = acc.prepare_model(self.raw) if acc.num_processes > 1 else self.raw.to(acc.device)
        if s.compile:
            backend = "inductor" if s.compile is True else s.compile
            model = torch.compile(model, backend=backend, dynamic=None)  # same outputs; fewer kernel launches
        graphed = None
        if s.cuda_graph:  # one per fit: it holds the captured graph and its static buffers across epochs
            autocast = torch.bfloat16 if s.mixed_precision == "bf16" else None
            # with length buckets, one graph per bucket width (+ one for a short last batch)
            shapes = 1 if s.graph_bucket is None else -(-self._graph_width() // s.graph_bucket) + 1
            graphed = GraphedTrainStep(lambda b: model(**b).loss, optimizer, acc.device, autocast_dtype=autocast,
                                       max_shapes=shapes)
            widths = "every batch padded to one width" if s.graph_bucket is None else \
                f"one per {s.graph_bucket}-token width"
            log.info("training steps as CUDA graphs (%s%s; train.cuda_graph=false turns them off)", widths,
                     ", compiled" if s.compile else "")
        progress = {"step": 0, "best_score": None, "best_epoch": 0, "bad_epochs": 0, "history": [], "train_time": 0.0,
                    "dev_metrics": {}}
        self.state = progress
        start_epoch = 1
        if not self.checkpoints.exists():
            (self.run_dir / "log.csv").unlink(missing_ok=True)  # left by an earlier attempt that was discarded
        else:
            state = self.checkpoints.load()
            self.load_trainable(state["trainable"])
            load_optimizer_state(optimizer, scheduler, state["optimizer_state"], state["scheduler"])
            self.best_state = state["best"]
            progress = {k: state[k] for k in progress}
            self.state = progress
            start_epoch = state["epoch"] + 1
            log.info("resuming %s from epoch %d (step %d)", self.run_dir.name, state["epoch"], progress["step"])
            self._write_log(progress["history"])  # the log matches the checkpoint: no epoch lost or repeated
        resumed_from = start_epoch - 1
        progress["resumed_from_epoch"] = resumed_from
        progress["epoch"] = resumed_from
        bar = tqdm(range(start_epoch, s.epochs + 1), desc=self.run_dir.name, disable=not self.progress, leave=False,
                   initial=start_epoch - 1, total=s.epochs)
        last_checkpoint = time.perf_counter()
        best_unsaved = False  # a new best since the last checkpoint
        for epoch in bar:
            if self._done(progress):
                break
            progress["epoch"] = epoch
            t0 = time.perf_counter()
            loss_sum = self._train_epoch(model, optimizer, scheduler, epoch, shard, progress, graphed)
            epoch_time = time.perf_counter() - t0
            progress["train_time"] += epoch_time
            dev_metrics, _ = self.evaluate(self.dev_data)
            score = main_score(self.spec, dev_metrics)
            improved = progress["best_score"] is None or score > progress["best_score"]
            if improved:
                progress.update(best_score=score, best_epoch=epoch, bad_epochs=0, dev_metrics=dev_metrics)
                self.best_state = self._snapshot()
            else:
                progress["bad_epochs"] += 1
            row = {"epoch": epoch, "step": progress["step"], "train_loss": loss_sum, "dev_score": score,
                   "lr": float(scheduler.get_last_lr()[0]), "epoch_s": round(epoch_time, 3)}  # a tensor if capturable
            progress["history"].append(row)
            tracker.log({k: row[k] for k in ("train_loss", "dev_score", "lr", "epoch")}, step=progress["step"])
            best_unsaved |= improved
            if acc.is_main_process and self._checkpoint_due(epoch, last_checkpoint):
                saved = {k: v for k, v in progress.items() if k not in ("epoch", "resumed_from_epoch")}
                self.checkpoints.save(epoch, self._snapshot(), self.best_state if best_unsaved else None, optimizer,
                                      scheduler, saved)
                last_checkpoint, best_unsaved = time.perf_counter(), False
            if acc.is_main_process:
                self._write_log(progress["history"])  # a resume rewrites it from the checkpoint's history
            bar.set_postfix(loss=f"{loss_sum:.4f}", dev=f"{score:.4f}", best=f"{progress['best_score']:.4f}")
            log.info("epoch %d step %d loss %.4f dev %s %.4f%s", epoch, progress["step"], loss_sum,
                     self.spec.main_metric, score, " (best)" if improved else "")
        bar.close()
        if self.best_state is not None:
            self.load_trainable(self.best_state)
        epochs_run = len(progress["history"])
        return FitResult(
            best_epoch=progress["best_epoch"], epochs_run=epochs_run, steps=progress["step"],
            dev_metrics=progress["dev_metrics"], history=progress["history"], train_s=progress["train_time"],
            train_step_s=progress["train_time"] / max(progress["step"], 1),
            train_epoch_s=progress["train_time"] / max(epochs_run, 1), resumed_from_epoch=resumed_from,
        )

    def _checkpoint_due(self, epoch: int, last_checkpoint: float) -> bool:
        return time.perf_counter() - last_checkpoint >= self.settings.checkpoint_every_s

    def _done(self, progress: dict) -> bool:
        s = self.settings
        if progress["bad_epochs"] >= s.patience:
            return True
        return s.max_steps is not None and progress["step"] >= s.max_steps

    def _graph_width(self) -> int:
        """The widest training batch under train.cuda_graph: `pad_to`, else the longest training example."""
        return self.pad_to or max(len(ids) for ids in self.train_data.input_ids)

    def _train_epoch(self, model, optimizer, scheduler, epoch: int, shard, progress: dict,
                     graphed: GraphedTrainStep | None = None) -> float:
        s, acc = self.settings, self.accelerator
        model.train()
        torch.manual_seed(s.seed * 1_000_003 + epoch)  # dropout stream: a function of (seed, epoch) for resume
        order = epoch_order(len(self.train_data), s.seed, epoch, shard)
        device = acc.device
        running = torch.zeros((), device=device)
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        n = 0
        pad_to = pad_multiple = None
        if graphed is not None:
            pad_to = self._graph_width()
            pad_multiple = s.graph_bucket  # None: every batch padded to pad_to
        for batch in batches(self.train_data, order, s.batch_size, self.pad_id, bucket=s.bucket, pad_to=pad_to,
                             pad_multiple=pad_multiple):
            if s.max_steps is not None and progress["step"] >= s.max_steps:
                break
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if graphed is not None:
                loss = graphed(batch)  # zero-grad, forward, backward and optimizer step: one graph replay
                progress["step"] += 1
            else:
                with acc.autocast():
                    loss = model(**batch).loss
                progress["step"] += 1
                if s.inject_nan_at_step is not None and progress["step"] >= s.inject_nan_at_step:
                    loss = loss * float("nan")
                optimizer.zero_grad(set_to_none=True)
                acc.backward(loss)
                optimizer.step()
                loss = loss.detach()
            bad = ~torch.isfinite(loss)
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, progress["step"]), first_bad)
            running += loss.float()  # before the next step: a graph's loss buffer is overwritten by the next replay
            scheduler.step()
            n += 1
            if progress["step"] % s.check_every == 0:
                self._check_finite(first_bad, epoch)
        self._check_finite(first_bad, epoch)
        return (running / max(n, 1)).item()

    @staticmethod
    def _check_finite(first_bad: torch.Tensor, epoch: int) -> None:
        step = int(first_bad.item())
        if step >= 0:
            raise TrainingDiverged(step, epoch)

    def _write_log(self, history: list[dict]) -> None:
        write_log(self.run_dir, history)


def write_log(run_dir, history: list[dict]) -> None:
    """Rewrite `<run_dir>/log.csv` (one row per finished epoch) atomically from the history."""
    if not history:
        (run_dir / "log.csv").unlink(missing_ok=True)
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "log.csv", buffer.getvalue())
