"""One forward for many runs: the frozen encoder runs once over the stacked batches of R runs.

Each run is a task of one `PeltModel` (its own modules, gates and head). A grouped batch holds B rows per run,
run after run: rows [r*B, (r+1)*B) belong to run r. While the engine's forward runs, the model's active task is
`GROUP`, and every site calls the group's callables instead of one task's: each method reads its per-run
parameters as stacks over the runs (zeros for runs without that method, which add exactly nothing) and applies
them with batched matmuls over runs, so the number of kernels per step does not grow with R. The stacks are made
once per group and hold the runs' parameters themselves (stacks.py), so a step never re-stacks or routes
gradients per parameter.

Methods take part through `PeltMethod.attach_group(engine)` (one per method file, like `attach`); the engine
supplies the stacking, the per-run gates and the per-run dropout (see noise.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from ..gates import Gate
from ..methods import method_class
from ..model import PeltModel
from ..sites import matmul_dtype
from .attention import check_attention_dropout, dropout_attention, fused_dropout_attention
from .noise import NoiseBatch, NoiseLayout, apply_dropout
from .stacks import ParameterStacks
from .transfer import to_device

GROUP = "__group__"


class NotGroupable(ValueError):
    """A run (or a pair of runs) that cannot share a grouped forward; the message says why."""


@dataclass
class GroupStep:
    runs: list[str]
    rows: int
    noise: NoiseBatch | None
    collect_gates: bool = False
    methods: dict = field(default_factory=dict)  # method name -> per-run instances (see GroupEngine.methods)


class GroupEngine:
    def __init__(self, model: PeltModel, members: list[str], max_length: int,
                 attention_dropout: str = "per_run") -> None:
        """`attention_dropout`: "per_run" (each run's mask on the attention probabilities from its own noise stream:
        a run trains the same in any group) or "fused" (one SDPA kernel with its own dropout; attention.py)."""
        self.model = model
        self.attention_dropout = check_attention_dropout(attention_dropout)
        self.injector = model.injector
        self.info = model.info
        self.members = list(members)
        self.max_length = max_length
        if len(set(members)) != len(members) or not members:
            raise ValueError(f"a group needs distinct member tasks, got {members}")
        check_compatible([model.tasks[m].config for m in members])
        self.method_names = sorted({n for m in members for n in model.tasks[m].methods})
        self._layer_gates: dict[int, list[tuple[str, str, object]]] = {}
        self._prefix_provider = None
        self._lists: dict = {}
        self._constants: dict = {}
        self._frozen: dict | None = None  # see frozen_parameters
        # fp32 (or wider), also after GroupTrainer casts the frozen encoder to bf16: a group re-formed after that
        # cast must build the same masks and gate pooling weights as before it
        self.mask_dtype = torch.promote_types(model.encoder.dtype, torch.float32)
        self.stacks = ParameterStacks(len(self.members))  # the runs' parameters, stacked once (stacks.py)
        self._member_pos = {m: i for i, m in enumerate(self.members)}
        self.prefix_length = 0
        self.step: GroupStep | None = None
        self.gate_log: dict[str, list[torch.Tensor | None]] = {}
        for name in self.method_names:
            method_class(name).attach_group(self)
        self._attach_dropout_and_attention()
        self._check_dropouts_covered()
        cfg = model.encoder.config
        self.noise_layout = NoiseLayout(self.info.hidden_size, self.info.num_heads, self.info.num_layers, max_length,
                                        self.prefix_length, probs=attention_dropout == "per_run")
        self.hidden_p = float(getattr(cfg, "hidden_dropout_prob", 0.0) or 0.0)
        self.probs_p = float(getattr(cfg, "attention_probs_dropout_prob", 0.0) or 0.0)

    # --- what methods use -------------------------------------------------------------------------------------
    @property
    def R(self) -> int:
        return len(self.step.runs)

    @property
    def B(self) -> int:
        return self.step.rows

    def methods(self, name: str) -> list:
        """The live runs' instances of method `name` (None for runs without it), in row order (cached per step)."""
        cache = self.step.methods
        if name not in cache:
            tasks = self.model.tasks
            cache[name] = [tasks[r].methods[name] if name in tasks[r].methods else None for r in self.step.runs]
        return cache[name]

    def member_methods(self, name: str) -> list:
        return [self.model.tasks[m].methods[name] for m in self.members if name in self.model.tasks[m].methods]

    def cached(self, key, build, stable: bool = False):
        """`build()` once per forward. `stable`: it depends only on the parameters (stacks, prefix states), so
        inside `frozen_parameters()` it is built once for all the forwards of the pass."""
        if stable and self._frozen is not None:
            full = (key, tuple(self.step.runs))
            if full not in self._frozen:
                self._frozen[full] = build()
            return self._frozen[full]
        cache = self.model.state.cache
        if key not in cache:
            cache[key] = build()
        return cache[key]

    @contextlib.contextmanager
    def frozen_parameters(self):
        """For a pass of forwards during which no parameter changes (an evaluation, under no_grad): the stacked
        parameters, prefix keys/values, gate and head weights are built by the first forward and reused by the
        rest, instead of re-stacking (and re-running every prefix MLP) for every batch."""
        if torch.is_grad_enabled():
            raise RuntimeError("frozen_parameters() is for evaluation passes under torch.no_grad()")
        self._frozen = {}
        try:
            yield
        finally:
            self._frozen = None

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype matmuls on `x` run in: autocast's, or x's own (sites.matmul_dtype)."""
        return matmul_dtype(x)

    def stack(self, key, name: str, tensors, shape: tuple, parameters: bool = True, dtype=None) -> torch.Tensor:
        """(R, n, *shape): `tensors(method)` gives the n tensors of one run (e.g. one per layer), or None for a run
        that lacks them (zeros, no gradient). Parameters live in the group's persistent stack (`persistent`);
        `parameters=False` for tensors computed from parameters in the forward (e.g. prefix states), stacked once
        per forward. `dtype`: the stack cast once per forward (not once per layer that reads it); a cast is exact,
        as autocast's own is."""

        def build():
            if not parameters:
                return torch.stack(self._flat(name, tensors, shape))
            return self.persistent(("stack", key), lambda: [self._flat(name, tensors, shape)])[0]

        flat = self.cached(("stack", key), build, stable=True)
        if dtype is not None and flat.dtype != dtype:
            flat = self.cached(("stack", key, dtype), lambda: flat.to(dtype), stable=True)
        return flat.view(self.R, -1, *shape)

    def stack_layers(self, key, name: str, tensors, shape: tuple, parameters: bool = True, dtype=None) -> tuple:
        """`stack(...)` split into its n per-layer (R, *shape) slices once per forward. Layers index this tuple:
        the backward of one unbind is one stack of the layers' gradients, where a select per layer (`[:, layer]`)
        would write a zero tensor the size of the whole stack for every layer and add them all up."""
        return self.cached(("layers", key, dtype),
                           lambda: self.stack(key, name, tensors, shape, parameters, dtype).unbind(1), stable=True)

    def persistent(self, key, build) -> tuple:
        """The live runs' rows of the group's stacks `key`: `build()` gives lists of member-major tensors (each run's
        parameters, zeros where a run lacks one), and is called once per group, for all members (see stacks.py);
        each list becomes a leaf that autograd and StackedAdamW update, the runs' parameters views into it."""
        stacks = self.stacks
        if stacks.get((key, 0)) is None:
            with self._as_members():
                parts = build()
            for i, entries in enumerate(parts):
                stacks.add((key, i), entries)
        return self._stack_rows(key, self._live_index())

    def owned_stacks(self, key, name: str, build) -> tuple[tuple, torch.Tensor | None]:
        """Like `persistent`, for tensors only runs with method `name` have, stacked over those members alone (no
        stand-ins: a prefix MLP is millions of values per run). `build(methods)` gets those members' instances.
        Returns the rows of the live runs that have the method, in live order, and their positions among the live
        runs (None: every live run has it)."""
        stacks = self.stacks
        if stacks.get((key, 0)) is None:
            with self._as_members():
                methods = self.methods(name)
            owners = [i for i, m in enumerate(methods) if m is not None]
            for i, entries in enumerate(build([methods[i] for i in owners])):
                stacks.add((key, i), entries, owners)
        owners = stacks.get((key, 0)).owners
        slot = {m: j for j, m in enumerate(owners)}
        live = [(pos, slot[self._member_pos[r]]) for pos, r in enumerate(self.step.runs) if self._member_pos[r] in slot]
        index = None if [j for _, j in live] == list(range(len(owners))) else \
            self.constant(("owned", key), [j for _, j in live], torch.long)
        positions = None if len(live) == self.R else self.constant(("owned_at", key), [p for p, _ in live], torch.long)
        return self._stack_rows(key, index), positions

    def _stack_rows(self, key, index: torch.Tensor | None) -> tuple:
        """The rows `index` (None: all) of every part (key, 0), (key, 1), ... of a stacked family."""
        out, i = [], 0
        while (stack := self.stacks.get((key, i))) is not None:
            out.append(stack.rows(index))
            i += 1
        return tuple(out)

    @contextlib.contextmanager
    def _as_members(self):
        """Builders see every member as a live run (stacks are made for the whole group, once)."""
        saved = self.step
        self.step = GroupStep(list(self.members), saved.rows if saved is not None else 1, None)
        try:
            yield
        finally:
            self.step = saved

    def _live_index(self) -> torch.Tensor | None:
        """Positions of the live runs among the members (None: all of them, in order: the stacks as they are)."""
        runs = self.step.runs
        if runs == self.members:
            return None
        return self.constant("live", [self._member_pos[r] for r in runs], torch.long)

    def tensor_list(self, key, build) -> list:
        """A list of tensors that depends only on the live runs, built once per set of runs."""
        full = (key, tuple(self.step.runs))
        if full not in self._lists:
            self._lists[full] = build()
        return self._lists[full]

    def _flat(self, name: str, tensors, shape: tuple) -> list:
        per_run = [tensors(m) if m is not None else None for m in self.methods(name)]
        n = next(len(t) for t in per_run if t is not None)
        like = next(t[0] for t in per_run if t is not None)
        zero = like.new_zeros(shape)
        return [t for ts in per_run for t in (ts if ts is not None else [zero] * n)]

    def per_run(self, key, values) -> torch.Tensor:
        """A (R,) float tensor on the model's device from one Python number per live run."""
        return self.constant(("per_run", key), values, torch.float32)

    def constant(self, key, values, dtype) -> torch.Tensor:
        """A small device tensor from Python values, kept across forwards while the values stay the same: no
        host-to-device copy per forward, and never one that waits for the GPU (see to_device)."""
        full = (key, tuple(values), dtype)
        if full not in self._constants:
            self._constants[full] = to_device(values, dtype, self.device)
        return self._constants[full]

    @property
    def device(self) -> torch.device:
        return next(self.model.encoder.parameters()).device

    def rows(self, values: torch.Tensor) -> torch.Tensor:
        """(R,) per-run values -> (R*B,) per-row values; once per forward for each tensor (the per-run constants
        are read by every layer)."""
        cache = self.model.state.cache
        hit = cache.get(("rows", id(values)))
        if hit is None or hit[0] is not values:  # the tensor is kept with its rows: its id cannot be reused
            hit = cache[("rows", id(values))] = (values, values.repeat_interleave(self.B))
        return hit[1]

    def layer_gate(self, layer: int, kind: str, method_name: str, getter) -> None:
        """Register a gate kind reading layer `layer`'s input; `getter(method)` gives a run's Gate or None."""
        self._layer_gates.setdefault(layer, []).append((kind, method_name, getter))

    def gate(self, layer: int, kind: str):
        """(values (R*B,) float, gated (R,) bool) of a layer-input gate kind; runs without that gate get 1."""
        table = self.cached(("layer_gates", layer), lambda: self._layer_gate_values(layer))
        return table[kind]

    def _layer_gate_values(self, layer: int) -> dict:
        kinds = self._layer_gates.get(layer, [])
        per_kind = [[getter(m) if m is not None else None for m in self.methods(method_name)]
                    for _, method_name, getter in kinds]
        if not any(g is not None for gates in per_kind for g in gates):
            none = self._finish_gate("", layer, None, [False] * self.R)
            return {kind: none for kind, _, _ in kinds}
        x = self.injector.layer_input(layer)
        # one stack for all layers, split per layer once (see stack_layers)
        w, b = self.cached(("layer_gate_layers",), lambda: tuple(
            t.unbind(1) for t in self.cached(("layer_gate_params",), self._layer_gate_params, stable=True)),
            stable=True)
        values = self._gate_values_with(x, w[layer], b[layer])  # (R*B, n)
        out = {}
        for j, (kind, _, _) in enumerate(kinds):
            gated = [g is not None for g in per_kind[j]]
            out[kind] = self._finish_gate(kind, layer, values[:, j], gated)
        return out

    def input_gate(self, x: torch.Tensor, method_name: str, layer_gates, kind: str, layer: int):
        """Gate values of per-run gates reading `x` itself (e.g. an adapter's input): `layer_gates(method)` gives a
        run's gates of every layer (None for a run, or a layer, without one); stacked once for all layers."""
        gates = self.tensor_list(("input_gates", kind, layer), lambda: [
            g[layer] if (g := layer_gates(m) if m is not None else None) is not None else None
            for m in self.methods(method_name)])
        if all(g is None for g in gates):
            return self._finish_gate(kind, layer, None, [False] * self.R)
        L = self.info.num_layers

        def lists():
            per_run = [layer_gates(m) if m is not None else None for m in self.methods(method_name)]
            return self._gate_tensors([g[i] if g is not None else None for g in per_run for i in range(L)])

        def layers():
            w, b = self.persistent(("input_gate", kind), lists)
            return w.view(self.R, L, 1, -1).unbind(1), b.view(self.R, L, 1, 1).unbind(1)

        w, b = self.cached(("input_gate", kind), layers, stable=True)
        values = self._gate_values_with(x, w[layer], b[layer])[:, 0]
        return self._finish_gate(kind, layer, values, [g is not None for g in gates])

    def _finish_gate(self, kind: str, layer: int, values: torch.Tensor, gated: list[bool]):
        gated_t = self.constant("gated", gated, torch.bool)
        if not any(gated):
            return None, gated_t
        if self.step.collect_gates:
            log = self.gate_log.setdefault(kind, [None] * self.info.num_layers)
            log[layer] = values.detach()
        return values, gated_t

    def _layer_gate_params(self):
        """(R, L, n, h) weights and (R, L, 1, n) biases of every layer-input gate of every run: one stack for all
        layers (zeros where a run lacks that gate)."""
        L = self.info.num_layers
        n = max(len(self._layer_gates.get(i, [])) for i in range(L))
        w, b = self.persistent("layer_gates", lambda: self._layer_gate_lists(n))
        return w.view(self.R, L, n, -1), b.view(self.R, L, 1, n)

    def _layer_gate_lists(self, n: int):
        L = self.info.num_layers
        per_layer = [[[getter(m) if m is not None else None for m in self.methods(method_name)]
                      for _, method_name, getter in self._layer_gates.get(i, [])] for i in range(L)]
        ordered = [per_layer[i][j][r] if j < len(per_layer[i]) else None
                   for r in range(self.R) for i in range(L) for j in range(n)]
        return self._gate_tensors(ordered)

    def _gate_tensors(self, gates: list) -> tuple[list, list]:
        """Weights and biases of `gates` in order; a zero gate (no gradient) stands in for None."""
        zero_w = torch.zeros(1, self.info.hidden_size, device=self.device)
        zero_b = torch.zeros(1, device=self.device)
        return ([zero_w if g is None else g.proj.weight for g in gates],
                [zero_b if g is None else g.proj.bias for g in gates])

    def _gate_values_with(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        R, B = self.R, self.B
        h, n = x.shape[-1], w.shape[1]
        T = x.shape[1]
        logits = torch.baddbmm(b.to(x.dtype), x.reshape(R, B * T, h), w.to(x.dtype).transpose(1, 2))
        per_token = torch.sigmoid(logits).view(R * B, T, n)
        pool = self.cached(("pool", T, per_token.dtype), lambda: self._pool_weights(T, per_token.dtype))
        return torch.bmm(pool, per_token).squeeze(1)

    def _pool_weights(self, T: int, dtype) -> torch.Tensor:
        mask = self.model.state.mask
        if mask is None:
            return torch.full((self.R * self.B, 1, T), 1.0 / T, device=self.device, dtype=dtype)
        return (mask / mask.sum(1, keepdim=True).clamp_min(1)).to(dtype).unsqueeze(1)

    def set_prefix_provider(self, length: int, provider) -> None:
        """`provider(layer)` -> (k, v) of shape (R*B, H, P, D) and a (R,) bool of runs that have a prefix."""
        self.prefix_length = length
        self._prefix_provider = provider

    # --- dropout and attention --------------------------------------------------------------------------------
    def _attach_dropout_and_attention(self) -> None:
        bb = self.injector.backbone
        self.injector.root_site(bb.embedding_dropout).set_replace(GROUP, self._dropout("emb"))
        for i in range(self.info.num_layers):
            self.injector.site(i, bb.attn_output_site).set_replace(GROUP, self._dropout(("attn", i)))
            self.injector.site(i, bb.ffn_output_site).set_replace(GROUP, self._dropout(("ffn", i)))
            self.injector.attention_site(i).set_replace(GROUP, self._attention(i))

    def _check_dropouts_covered(self) -> None:
        """Every active dropout of the encoder must draw per-run noise: one the backbone map does not name would draw
        from torch's global stream and silently tie the runs of a group together."""
        from ..sites import ModuleSite, PrefixAttentionSite

        covered = set()
        for module in self.model.encoder.modules():
            if isinstance(module, ModuleSite) and GROUP in module._replace:
                covered.add(id(module.base))
            if isinstance(module, PrefixAttentionSite) and GROUP in module._replace:
                covered.update(id(m) for m in module.base.modules())  # its attention is recomputed here
        loose = [name for name, m in self.model.encoder.named_modules()
                 if isinstance(m, torch.nn.Dropout) and m.p > 0 and id(m) not in covered]
        if loose:
            raise NotGroupable(f"encoder dropout(s) {loose} are not covered by the backbone map's dropout sites; "
                               "grouped runs would share their random masks (add them to unipelt/backbones.py)")

    def _dropout(self, name):
        def fn(x: torch.Tensor) -> torch.Tensor:
            noise = self.step.noise
            if noise is None or self.hidden_p == 0:
                return x
            return apply_dropout(x, noise.hidden_keep(name, self.hidden_p, x.shape[1]), self.hidden_p)

        return fn

    def _key_mask(self, prefix: int, has_prefix: torch.Tensor | None):
        """(R*B, 1, 1, P+T) bool: real tokens, and prefix positions for rows of runs that have a prefix."""
        mask = self.model.state.mask
        if mask is None and not prefix:
            return None

        def build():
            keep = mask > 0 if mask is not None else None
            if not prefix:
                return keep[:, None, None, :]
            cols = self.rows(has_prefix.float()).bool()[:, None].expand(-1, prefix)
            if keep is None:
                keep = cols.new_ones(cols.shape[0], self.model.state.layer_inputs[0].shape[1])
            return torch.cat([cols, keep], dim=1)[:, None, None, :]

        return self.cached(("key_mask", prefix), build)

    def _biased_mask(self, mask, bias: torch.Tensor, prefix: int, dtype) -> torch.Tensor:
        """Additive (R*B, H, T, P+T) mask: the score bias on token columns, 0 on prefix columns, -inf where hidden."""

        def build():
            full = F.pad(bias.to(dtype), (prefix, 0))
            return full if mask is None else full.masked_fill(~mask, float("-inf"))

        return self.cached(("biased_mask", prefix, dtype), build)

    def _attention(self, layer: int):
        def fn(site, hidden: torch.Tensor, score_bias=None, **kwargs):
            q, k, v = site.projections(hidden, fused=False)  # the grouped records' numerics, as trained so far
            prefix, has_prefix = 0, None
            provided = self._prefix_provider(layer) if self._prefix_provider is not None else None
            if provided is not None:
                pk, pv, has_prefix = provided
                prefix = pk.shape[2]
                k = torch.cat([pk.to(k.dtype), k], dim=2)
                v = torch.cat([pv.to(v.dtype), v], dim=2)
            mask = self._key_mask(prefix, has_prefix)
            if score_bias is not None:  # e.g. MPNet's relative position bias: token-token scores only
                mask = self._biased_mask(mask, score_bias, prefix, q.dtype)
            scale = site.head_dim ** -0.5
            noise = self.step.noise
            if noise is None or self.probs_p == 0:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            elif self.attention_dropout == "fused":
                out = fused_dropout_attention(q, k, v, mask, self.probs_p, scale)
            else:  # explicit probabilities: each run's dropout mask on them comes from its own stream
                tokens, cols = noise.probs_noise(layer, q.shape[2], prefix)
                out = dropout_attention(q, k, v, mask, tokens, cols, self.probs_p, scale,
                                        compact=self.model.state.activations == "bf16")
            n, _, t, _ = out.shape
            return out.transpose(1, 2).reshape(n, t, site.num_heads * site.head_dim), None

        return fn

    # --- the forward ------------------------------------------------------------------------------------------
    def forward(self, runs: list[str], input_ids, attention_mask=None, token_type_ids=None,
                noise: NoiseBatch | None = None, collect_gates: bool = False) -> torch.Tensor:
        """Logits (R*B, C) for a batch of B rows per run in `runs` (a subset of the members, in row order)."""
        if input_ids.shape[0] % len(runs):
            raise ValueError(f"{input_ids.shape[0]} rows do not split evenly over {len(runs)} runs")
        unknown = [r for r in runs if r not in self.members]
        if unknown:
            raise ValueError(f"runs {unknown} are not members of this group")
        state = self.model.state
        previous = state.active
        self.step = GroupStep(list(runs), input_ids.shape[0] // len(runs), noise, collect_gates)
        if collect_gates:
            self.gate_log = {}
        state.begin(attention_mask, self.mask_dtype)
        state.active = GROUP
        try:
            # The padding mask reaches attention through `state` (_key_mask). The encoder gets none: its own mask
            # is unused here, and building it costs a host sync per forward (transformers asks mask.all()).
            kwargs = {"input_ids": input_ids}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            hidden = self.model.encoder(**kwargs).last_hidden_state
            return self._heads(hidden)
        finally:
            state.active = previous

    def _heads(self, hidden: torch.Tensor) -> torch.Tensor:
        R, B = self.R, self.B
        heads = self.tensor_list("heads", lambda: [self.model.tasks[r].head for r in self.step.runs])
        h = hidden.shape[-1]
        C = heads[0].num_labels

        def params():
            member_heads = [self.model.tasks[r].head for r in self.step.runs]
            return [[getattr(getattr(hd, m), a) for hd in member_heads]
                    for m in ("dense", "out") for a in ("weight", "bias")]

        dense_w, dense_b, out_w, out_b = self.cached(  # (R,h,h) (R,h) (R,C,h) (R,C)
            ("head_params",), lambda: self.persistent("heads", params), stable=True)
        dense_b, out_b = dense_b.unsqueeze(1), out_b.unsqueeze(1)
        x = hidden[:, 0].reshape(R, B, h)
        noise = self.step.noise
        p = self.per_run("head_p", [hd.dropout.p for hd in heads]).view(R, 1, 1)
        if noise is not None:
            x = apply_dropout(x, noise.head_keep("head1", p.view(-1)), p.to(x.dtype))
        x = torch.tanh(torch.baddbmm(dense_b.to(x.dtype), x, dense_w.to(x.dtype).transpose(1, 2)))
        if noise is not None:
            x = apply_dropout(x, noise.head_keep("head2", p.view(-1)), p.to(x.dtype))
        logits = torch.baddbmm(out_b.to(x.dtype), x, out_w.to(x.dtype).transpose(1, 2))
        return logits.reshape(R * B, C)

    def losses(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(R,) mean loss of each run over its valid rows (cross-entropy, or MSE for one output)."""
        R = self.R
        if logits.shape[-1] == 1:
            per_row = (logits.squeeze(-1).float() - labels.float()) ** 2
        else:
            per_row = F.cross_entropy(logits.float(), labels.long(), reduction="none")
        per_row = per_row.view(R, -1)
        if valid is None:
            return per_row.mean(1)
        valid = valid.view(R, -1).to(per_row.dtype)
        return (per_row * valid).sum(1) / valid.sum(1).clamp_min(1)

    def close(self) -> None:
        """Remove the group's callables from the encoder sites (the runs' own modules stay, with storage of their
        own again)."""
        self.stacks.release()
        self.injector.remove_task(GROUP)


def check_compatible(configs: list) -> None:
    """Raise NotGroupable when the runs' method settings cannot share one grouped forward."""
    if any(c.gate_pooling != "masked" for c in configs):
        raise NotGroupable("gate_pooling='all' averages gates over padding, which a group's shared padding would "
                           "change; only gate_pooling='masked' runs can be grouped")
    seen: dict[str, tuple] = {}
    for cfg in configs:
        for name, mcfg in cfg.methods.items():
            cls = method_class(name)
            if not cls.groupable:
                raise NotGroupable(f"method {name!r} has no grouped implementation (it trains alone)")
            key = cls.group_key(mcfg)
            if name in seen and seen[name] != key:
                raise NotGroupable(f"method {name!r}: runs with {seen[name]} and {key} cannot share a group")
            seen[name] = key

