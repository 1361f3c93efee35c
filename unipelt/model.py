"""PeltModel: one frozen encoder, per-task PEFT modules and heads, and the forward that ties them together."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import backbone_for
from .config import PeltConfig
from .head import ClassificationHead
from .injector import Injector
from .methods import EncoderInfo, PeltMethod, method_class
from .state import ForwardState


@dataclass
class PeltOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class TaskModules(nn.Module):
    """Everything one task adds to the encoder: its methods (with their gates) and its head."""

    def __init__(self, config: PeltConfig, methods: dict[str, PeltMethod], head: ClassificationHead) -> None:
        super().__init__()
        self.config = config
        self.methods = nn.ModuleDict(methods)
        self.head = head

    @property
    def trains_encoder(self) -> bool:
        return any(m.trains_encoder for m in self.methods.values())


class PeltModel(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone_for(encoder)
        pooler = getattr(encoder, "pooler", None)
        self._pretrained_pooler = [pooler]  # kept out of the module tree: only its weights seed each head
        if pooler is not None:
            encoder.pooler = None  # the head replaces it; skipping it saves compute
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.state = ForwardState()
        self.injector = Injector(encoder, self.backbone, self.state)
        self.tasks = nn.ModuleDict()
        self.info = self._encoder_info()

    def __deepcopy__(self, memo):
        # The encoder's hooks and the gate banks are closures over this model's forward state; a deep copy would
        # keep them pointing at the original, so the copy would silently read the original's activations.
        raise TypeError("a PeltModel cannot be deep-copied (its hooks share this model's forward state); build a "
                        "new PeltModel on a copy of the encoder and load the modules into it (save_task/load_task, "
                        "or load_state_dict)")

    def _encoder_info(self) -> EncoderInfo:
        cfg = self.encoder.config
        layer = self.injector.layers[0]
        shapes = {}
        for role, path in self.backbone.linears.items():
            linear = layer.get_submodule(path)
            shapes[role] = (linear.in_features, linear.out_features)
        return EncoderInfo(
            num_layers=self.injector.num_layers,
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            head_dim=cfg.hidden_size // cfg.num_attention_heads,
            linear_shapes=shapes,
            layer_norms=self.backbone.layer_norms,
        )

    # --- tasks ----------------------------------------------------------------------------------------------
    def add_task(self, name: str, config: PeltConfig, num_labels: int, activate: bool = True) -> TaskModules:
        """Attach a new set of modules (and a head) under `name`. Several tasks can share the encoder."""
        if name in self.tasks:
            raise ValueError(f"task {name!r} is already attached; remove_task({name!r}) first")
        methods = {
            m: method_class(m)(cfg, self.info, gate_pooling=config.gate_pooling) for m, cfg in config.methods.items()
        }
        head = ClassificationHead(self.info.hidden_size, num_labels, config.head_dropout, self._pretrained_pooler[0])
        modules = TaskModules(config, methods, head)
        if modules.trains_encoder and len(self.tasks) > 0:
            raise ValueError("full fine-tuning changes the shared encoder: it cannot be combined with other tasks")
        if any(t.trains_encoder for t in self.tasks.values()):
            raise ValueError("a full fine-tuning task is attached: it owns the encoder, so no other task can be added")
        device = next(self.encoder.parameters()).device
        modules.to(device)
        modules.train(self.training)  # a task added to a model in eval mode must not run dropout
        self.tasks[name] = modules
        for method in methods.values():
            method.attach(self.injector, name)
        if activate:
            self.set_active_task(name)
        return modules

    def remove_task(self, name: str) -> None:
        self.injector.remove_task(name)
        del self.tasks[name]
        if self.state.active == name:
            self.state.active = None
            self.encoder.requires_grad_(False)

    def set_active_task(self, name: str) -> None:
        if name not in self.tasks:
            raise KeyError(f"no task {name!r}; attached: {', '.join(self.tasks) or '(none)'}")
        self.state.active = name
        self.encoder.requires_grad_(self.tasks[name].trains_encoder)

    @property
    def active_task(self) -> str:
        if self.state.active is None:
            raise RuntimeError("no active task: call add_task(...) or set_active_task(...) first")
        return self.state.active

    @property
    def active(self) -> TaskModules:
        return self.tasks[self.active_task]

    # --- forward --------------------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> PeltOutput:
        task = self.active
        self.state.begin(attention_mask, self.encoder.dtype)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        logits = task.head(hidden)
        loss = None if labels is None else task_loss(logits, labels)
        return PeltOutput(logits=logits, loss=loss)

    # --- introspection --------------------------------------------------------------------------------------
    def trainable_named_parameters(self, task: str | None = None) -> dict[str, nn.Parameter]:
        """The parameters that train for a task: its modules and head, plus the encoder for full fine-tuning."""
        task = task or self.active_task
        params = {f"tasks.{task}.{n}": p for n, p in self.tasks[task].named_parameters()}
        if self.tasks[task].trains_encoder:
            params.update({f"encoder.{n}": p for n, p in self._encoder_parameters()})
        return params

    def _encoder_parameters(self):
        """Encoder parameters under their original names (site wrappers are looked through)."""
        for name, p in self.encoder.named_parameters():
            yield name.replace(".base.", "."), p

    def parameter_counts(self, task: str | None = None) -> dict[str, int | float]:
        task = task or self.active_task
        modules = self.tasks[task]
        encoder = sum(p.numel() for _, p in self._encoder_parameters())
        head = sum(p.numel() for p in modules.head.parameters())
        trainable = sum(p.numel() for p in self.trainable_named_parameters(task).values())
        counts: dict[str, int | float] = {
            "trainable": trainable,
            "head": head,
            "modules": trainable - head,
            "encoder": encoder,
            "total": encoder + sum(p.numel() for p in modules.parameters()),
            "percent": 100.0 * trainable / encoder,
            "percent_modules": 100.0 * (trainable - head) / encoder,
        }
        for method in modules.methods.values():
            counts.update(method.size_report())
        return counts

    def gate_values(self, task: str | None = None) -> dict[str, list[torch.Tensor | None]]:
        """Gate values of the last forward: submodule name -> one (batch,) tensor per layer."""
        task = task or self.active_task
        values: dict[str, list] = {}
        for method in self.tasks[task].methods.values():
            values.update(method.gate_values())
        return values

    def fold_prefix(self, task: str | None = None) -> None:
        """Fold prefix-tuning's MLP into plain key/value tensors (eval mode only; the method refuses otherwise)."""
        self.tasks[task or self.active_task].methods["prefix"].fold()


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())

