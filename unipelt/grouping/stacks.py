"""The group's per-run parameters, kept stacked over the runs, and the AdamW that updates them as stacks.

A grouped forward reads each per-run tensor (a LoRA A of every layer, an adapter's weights, a gate, a head) as one
stack over the runs. Stacking the runs' parameters anew at every step, then handing every parameter its slice of
the stack's gradient and stepping each run's AdamW tensor by tensor, costs host work per parameter of every run
(about 13,000 views per step at 35 runs). Here each stack is made once per group and is itself the leaf that
autograd and the optimizer see; every run's own parameters are re-pointed at their rows of it (`param.data` is a
view), so snapshots, checkpoints, saved modules and the run's own forward still read and write the run's tensors,
now in the stack's storage. `StackedAdamW` updates a whole stack per kernel, each row with its own run's learning
rate, weight decay, betas, eps and step count, and leaves the rows of runs that did not train this step (or that
lack the tensor: zero stand-ins) exactly as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .transfer import to_device


@dataclass
class ParameterStack:
    """One per-run tensor family stacked over members of the group: `leaf` is (len(owners) * n, *shape), owner-major
    (`owners`: the members' positions, all of them or those that have the tensor); `params[e]` is the run's
    parameter of entry e (None for a zero stand-in of a run without the tensor)."""

    key: object
    leaf: torch.Tensor
    n: int  # entries per owner
    owners: list[int]
    params: list
    table_index: torch.Tensor  # (E,) long: the entry's row in StackedAdamW's table (its member; stand-ins: the last)

    def rows(self, live: torch.Tensor | None) -> torch.Tensor:
        """(R*n, *shape): the rows of the owners in `live` (positions in `owners`), in that order; None: all."""
        if live is None:
            return self.leaf
        shape = self.leaf.shape[1:]
        return self.leaf.view(-1, self.n, *shape).index_select(0, live).view(-1, *shape)


class ParameterStacks:
    """Every stack of one group, made on first use and kept for the group's life."""

    def __init__(self, members: int) -> None:
        self.members = members
        self.stacks: dict[object, ParameterStack] = {}
        self.owned: dict[int, object] = {}  # id(param) -> key of the stack that holds it

    def get(self, key) -> ParameterStack | None:
        return self.stacks.get(key)

    def add(self, key, entries: list[torch.Tensor], owners: list[int] | None = None) -> ParameterStack:
        """Stack `entries` (n tensors of each member in `owners` (default: all), owner-major; parameters, or stand-ins
        that need no gradient) into a new leaf, and re-point every parameter among them at its row."""
        owners = list(range(self.members)) if owners is None else list(owners)
        if not owners or len(entries) % len(owners):
            raise ValueError(f"stack {key!r}: {len(entries)} entries do not split over the members {owners}")
        n = len(entries) // len(owners)
        with torch.no_grad():
            leaf = torch.stack([e.detach() for e in entries])
        trainable = [isinstance(e, torch.nn.Parameter) and e.requires_grad for e in entries]
        leaf.requires_grad_(any(trainable))
        params = [e if t else None for e, t in zip(entries, trainable)]
        for e, p in enumerate(params):
            if p is None:
                continue
            if id(p) in self.owned:
                raise RuntimeError(f"a parameter of stack {key!r} is already stacked in {self.owned[id(p)]!r}")
            self.owned[id(p)] = key
            p.data = leaf.data[e]  # the run's tensor now lives in the stack (same values)
        table = [owners[e // n] if t else self.members for e, t in enumerate(trainable)]
        stack = ParameterStack(key, leaf, n, owners, params, to_device(table, torch.long, leaf.device))
        self.stacks[key] = stack
        return stack

    def __iter__(self):
        return iter(self.stacks.values())

    def holds(self, param: torch.Tensor) -> bool:
        return id(param) in self.owned

    def zero_grad(self) -> None:
        for stack in self:
            stack.leaf.grad = None

    def release(self) -> None:
        """Give every parameter storage of its own again (the group is over)."""
        for stack in self:
            for p in stack.params:
                if p is not None:
                    p.data = p.data.clone()
        self.stacks.clear()
        self.owned.clear()


def saved_steps(optimizer: torch.optim.Optimizer) -> int:
    """The updates a run's optimizer has made (torch's per-parameter "step", the same for all of a run's parameters,
    which are stepped together; 0 for a fresh one). Read once, when a group forms, so that a step's coefficients
    can be computed before its forward has made the stacks (a graphed step)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                return int(float(state["step"]))
    return 0


class StackedAdamW:
    """AdamW (decoupled weight decay, torch's arithmetic) over every stack at once, per row with its run's own
    hyper-parameters and step count. The runs' `torch.optim.AdamW` objects stay the source of the hyper-parameters
    (their schedulers set the learning rate) and of the saved state: `load_from` reads a resumed run's moments out of
    its optimizer, `export_to` writes them back before a checkpoint, in the optimizer's own state format."""

    COLUMNS = 7  # decay, 1-beta1, beta2, 1-beta2, -lr/bias_correction1, sqrt(bias_correction2), eps

    def __init__(self, stacks: ParameterStacks, optimizers: list) -> None:
        self.stacks = stacks
        self.optimizers = optimizers  # one per member, in member order
        self.steps = [saved_steps(o) for o in optimizers]  # updates each member has had (torch's "step")
        self.moments: dict[object, tuple[torch.Tensor, torch.Tensor]] = {}

    def _hyper(self, member: int) -> tuple[float, float, float, float, float]:
        group = self.optimizers[member].param_groups[0]
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("stacked AdamW supports neither amsgrad nor maximize")
        beta1, beta2 = group["betas"]
        return float(group["lr"]), float(group["weight_decay"]), float(beta1), float(beta2), float(group["eps"])

    def load_from_optimizers(self) -> None:
        """Moments of parameters whose optimizer has state (a resumed run); zeros otherwise."""
        for stack in self.stacks:
            if stack.key in self.moments:
                continue
            exp_avg = torch.zeros_like(stack.leaf, memory_format=torch.contiguous_format)
            exp_avg_sq = torch.zeros_like(exp_avg)
            for e, p in enumerate(stack.params):
                if p is None:
                    continue
                member = stack.owners[e // stack.n]
                state = self.optimizers[member].state.get(p)
                if state and "exp_avg" in state:
                    exp_avg[e].copy_(state["exp_avg"])
                    exp_avg_sq[e].copy_(state["exp_avg_sq"])
            self.moments[stack.key] = (exp_avg, exp_avg_sq)

    def zero_grad(self) -> None:
        self.stacks.zero_grad()

    def step(self, members: list[int]) -> None:
        """One update of the rows of `members` (positions in the member list; their gradients in the leaves)."""
        if not any(s.leaf.grad is not None for s in self.stacks):
            return
        self.apply(self.table(members))  # apply loads the moments of stacks made since the last step

    def table(self, members: list[int]) -> torch.Tensor:
        """Count one update of `members` and give the (members + 1, COLUMNS) device table of this update's per-row
        coefficients: each member's from its optimizer's hyper-parameters (its schedule's current learning rate) and
        its step count; other members' rows, and the last row (zero stand-ins), leave a row as it is."""
        frozen = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
        table = [frozen] * (len(self.optimizers) + 1)
        for m in members:
            self.steps[m] += 1
            lr, wd, beta1, beta2, eps = self._hyper(m)
            t = self.steps[m]
            bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
            table[m] = [1 - lr * wd, 1 - beta1, beta2, 1 - beta2, -lr / bc1, math.sqrt(bc2), eps]
        device = self.optimizers[0].param_groups[0]["params"][0].device
        return to_device(table, torch.float32, device)

    def apply(self, table: torch.Tensor) -> None:
        """The update of every stack with a gradient, row by row with `table`'s coefficients (see `table`). Device
        work only, once the stacks have their moments: a CUDA graph can capture it, `table` being its static input."""
        self.load_from_optimizers()
        with torch.no_grad():
            for stack in self.stacks:
                grad = stack.leaf.grad
                if grad is None:
                    continue
                exp_avg, exp_avg_sq = self.moments[stack.key]
                coef = table.index_select(0, stack.table_index).view(-1, self.COLUMNS, *([1] * (grad.dim() - 1)))
                decay, c1, beta2, c2, step_size, bc2_sqrt, eps = coef.unbind(1)
                leaf = stack.leaf
                leaf.mul_(decay)
                exp_avg.lerp_(grad, c1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad * c2)
                denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
                leaf.addcdiv_(exp_avg * step_size, denom)

    def export_to(self, member: int) -> None:
        """Write member's moments and step count into its optimizer's state (clones, torch AdamW's layout), so
        that `optimizer.state_dict()` saves them like a run trained alone."""
        optimizer = self.optimizers[member]
        for stack in self.stacks:
            if stack.key not in self.moments:
                continue
            if member not in stack.owners:
                continue
            exp_avg, exp_avg_sq = self.moments[stack.key]
            first = stack.owners.index(member) * stack.n
            for e in range(first, first + stack.n):
                p = stack.params[e]
                if p is None:
                    continue
                optimizer.state[p] = {"step": torch.tensor(float(self.steps[member])),
                                      "exp_avg": exp_avg[e].clone(), "exp_avg_sq": exp_avg_sq[e].clone()}
