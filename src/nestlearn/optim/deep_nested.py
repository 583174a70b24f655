"""DeepNestedOptimizer: learned deep momentum + learned LR controller + multi-frequency CMS.

One step, per parameter p with clipped gradient g (all levels of the Nested Learning view):

1. CMS state (`ContinuumMemoryState`): level i accumulates g and, once every f_i steps, folds
   the chunk mean into its momentum m_i ← β m_i + (1 − β) a_i / f_i; a second moment v tracks g².
2. Deep momentum (`L2RegressionMomentum`): a coordinate-wise MLP maps
   x = [g, m̂_1 … m̂_L] / s (s = √v̂, bias-corrected) to a direction u. It starts as exactly
   Adam's direction m̂_1 / s, and learns from there.
3. Controller (`NestedController`): multiplier μ_G ∈ [0.1, 2] per group (core / memory).
4. θ ← θ − lr_G μ_G (u + wd θ)   (decoupled weight decay).

The same pure function (`_rule`) makes the real step (under no_grad) and each differentiable
step of the explicit-mode unroll, so the meta-gradient is the gradient of what really runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from nestlearn.optim.controller import NestedController, controller_features
from nestlearn.optim.meta_trainer import (
    LossFn,
    SimplifiedMetaTrainer,
    Transition,
    UnrolledMetaTrainer,
    create_meta_trainer,
)
from nestlearn.optim.param_groups import group_titans_params, infer_param_depth

BETA = 0.9  # momentum decay per firing of a CMS level
BETA2 = 0.999  # second-moment decay
EPS = 1e-8
LOSS_EMA = 0.9  # running mean of the loss that the controller compares against
REGRESSION_COORDS = 4096  # coordinates per tensor kept for the L2 regression objective
META_GRAD_CLIP = 1.0
# Momentum-MLP rows per [rows, hidden] activation block (16 MB at 64). Measured on a 2-core
# CPU: as fast as 4-16K-row blocks on one thread, and with 4x fewer (multi-threaded) kernel
# launches per step it keeps two threads busy instead of waiting at each launch's barrier.
MLP_CHUNK = 65536


@dataclass(frozen=True)
class ContinuumMemoryState:
    """Per-parameter multi-frequency state; immutable so the unroll can branch from it freely.

    Level i sums incoming gradients in `accumulators[i]` and, on every f_i-th advance, updates
    `momenta[i]` with the chunk mean and resets the sum; `fires[i]` counts those updates (for
    bias correction and for inspection). `steps` counts advances.
    """

    frequencies: tuple[int, ...]
    accumulators: tuple[Tensor, ...]
    momenta: tuple[Tensor, ...]
    fires: tuple[int, ...]
    second_moment: Tensor
    steps: int = 0
    owned: bool = dataclasses.field(default=False, compare=False, repr=False)

    @classmethod
    def zeros_like(cls, param: Tensor, frequencies: Sequence[int]) -> ContinuumMemoryState:
        zero = torch.zeros_like(param)
        n = len(frequencies)
        return cls(tuple(frequencies), (zero,) * n, (zero,) * n, (0,) * n, zero)

    def advanced(self, grad: Tensor) -> ContinuumMemoryState:
        """The state after one more gradient (pure: differentiable, never in place).

        A level of frequency 1 fires on every advance, so its accumulator is always the zero it
        was reset to: its chunk sum is `grad` itself and the zero tensor is kept, not re-made.
        """
        step = self.steps + 1
        accumulators, momenta, fires = [], [], []
        for freq, acc, mom, n in zip(self.frequencies, self.accumulators, self.momenta,
                                     self.fires, strict=True):
            total = grad if freq == 1 else acc + grad
            if step % freq == 0:
                mom = torch.lerp(mom, total if freq == 1 else total / freq, 1.0 - BETA)
                acc = acc if freq == 1 else torch.zeros_like(acc)
                n += 1
            else:
                acc = total
            accumulators.append(acc)
            momenta.append(mom)
            fires.append(n)
        second = torch.addcmul(self.second_moment * BETA2, grad, grad, value=1.0 - BETA2)
        return ContinuumMemoryState(self.frequencies, tuple(accumulators), tuple(momenta),
                                    tuple(fires), second, step)

    def advanced_(self, grad: Tensor) -> ContinuumMemoryState:
        """`advanced(grad)` computed in place (no autograd): the real step's fast path.

        Same operations, so the same values as `advanced`; the tensors are updated where they
        are, so this state must own them (`owned`), else they are copied first: a fresh state
        shares one zero tensor, and a loaded or exported one shares its tensors with the dict.
        """
        state = self if self.owned else self.detached_copy()
        step = state.steps + 1
        fires = []
        for freq, acc, mom, n in zip(state.frequencies, state.accumulators, state.momenta,
                                     state.fires, strict=True):
            if freq == 1:
                mom.lerp_(grad, 1.0 - BETA)
                n += 1
            else:
                acc.add_(grad)
                if step % freq == 0:
                    mom.lerp_(acc.div_(freq), 1.0 - BETA)
                    acc.zero_()
                    n += 1
            fires.append(n)
        state.second_moment.mul_(BETA2).addcmul_(grad, grad, value=1.0 - BETA2)
        return ContinuumMemoryState(state.frequencies, state.accumulators, state.momenta,
                                    tuple(fires), state.second_moment, step, owned=True)

    def detached_copy(self) -> ContinuumMemoryState:
        """A copy owning distinct tensors (a frequency-1 level's accumulator stays shared zero)."""
        zero = torch.zeros_like(self.second_moment)
        accs = tuple(zero if f == 1 else a.detach().clone()
                     for f, a in zip(self.frequencies, self.accumulators, strict=True))
        return ContinuumMemoryState(self.frequencies, accs,
                                    tuple(m.detach().clone() for m in self.momenta), self.fires,
                                    self.second_moment.detach().clone(), self.steps, owned=True)

    def disowned(self) -> ContinuumMemoryState:
        """This state, marked as sharing its tensors (the next `advanced_` copies them)."""
        return dataclasses.replace(self, owned=False) if self.owned else self

    def fired_levels(self) -> list[int]:
        """Levels that fired on the latest advance."""
        return [i for i, f in enumerate(self.frequencies) if self.steps and self.steps % f == 0]

    def scale(self) -> Tensor:
        """s = √(v̂ + ε²): smooth at v = 0, so second-order unrolls stay finite."""
        v_hat = self.second_moment * (1.0 / (1.0 - BETA2 ** max(self.steps, 1)))
        return torch.sqrt(v_hat + EPS * EPS)

    def inputs(self, grad: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        """Momentum-MLP input as `(raw [numel, L + 1], coef [L + 1])`; features = raw · coef.

        raw = [g, m_1 … m_L] / s and coef = [1, 1 / (1 − β^n_1) …] (0 for a level that has not
        fired, whose momentum is still zero): the bias corrections stay a per-column factor
        that the MLP folds into its weights instead of a pass over every coordinate.
        """
        raw = torch.stack([grad.reshape(-1), *(m.reshape(-1) for m in self.momenta)], dim=-1)
        coef = [1.0] + [1.0 / (1.0 - BETA ** n) if n else 0.0 for n in self.fires]
        return raw / scale.reshape(-1, 1), grad.new_tensor(coef)

    def to_dict(self) -> dict[str, Any]:
        return {"accumulators": list(self.accumulators), "momenta": list(self.momenta),
                "fires": list(self.fires), "second_moment": self.second_moment,
                "steps": self.steps}

    @classmethod
    def from_dict(cls, data: dict[str, Any], frequencies: Sequence[int]) -> ContinuumMemoryState:
        return cls(tuple(frequencies), tuple(data["accumulators"]), tuple(data["momenta"]),
                   tuple(int(n) for n in data["fires"]), data["second_moment"], int(data["steps"]))


class L2RegressionMomentum(nn.Module):
    """Deep momentum: a coordinate-wise MLP from (gradient, CMS momenta) features to a direction.

    u(x) = wᵀx + W₂ tanh(W₁ x), without biases: the map is odd, so flipping a coordinate's sign
    flips its update and the rule cannot drift. `skip_index` picks the input copied at init
    (W₂ = 0), which makes the untrained memory a standard momentum/Adam direction. It is
    trained by `regression_loss` (L2 on the next normalised gradient) and, in explicit mode,
    by the unrolled validation loss.
    """

    def __init__(self, n_inputs: int, hidden_dim: int = 64, skip_index: int = 1) -> None:
        super().__init__()
        if not 0 <= skip_index < n_inputs:
            raise ValueError(f"skip_index={skip_index} is invalid; expected 0 <= it < {n_inputs}")
        self.skip = nn.Parameter(torch.zeros(n_inputs))
        self.hidden = nn.Linear(n_inputs, hidden_dim, bias=False)
        self.out = nn.Linear(hidden_dim, 1, bias=False)
        with torch.no_grad():
            self.skip[skip_index] = 1.0
            self.out.weight.zero_()

    def forward(self, features: Tensor) -> Tensor:
        return self.direction(features, torch.ones_like(self.skip))

    def direction(self, raw: Tensor, coef: Tensor, with_hidden: bool = True) -> Tensor:
        """u(raw · coef) for `[N, n_inputs]` raw inputs and per-column factors `coef`.

        The factors are folded into the first-layer weights, and the `[N, hidden]` activation
        is made `MLP_CHUNK` rows at a time (never all N at once).
        `with_hidden=False` drops the hidden path: exact when the output layer is zero.
        """
        linear = raw @ (self.skip * coef)
        if not with_hidden:
            return linear
        w_in = (self.hidden.weight * coef).t()
        w_out = self.out.weight.reshape(-1)
        return torch.cat([
            torch.addmv(linear[i:i + MLP_CHUNK], (raw[i:i + MLP_CHUNK] @ w_in).tanh_(), w_out)
            for i in range(0, raw.shape[0], MLP_CHUNK)])

    @torch.no_grad()
    def direction_into(self, out: Tensor, columns: Sequence[Tensor], second_moment: Tensor,
                       v_corr: float, coef: Tensor, with_hidden: bool,
                       workspace: tuple[Tensor, Tensor, Tensor]) -> None:
        """`direction(raw, coef)` written into `out` (no autograd), the inputs made per chunk.

        raw = [columns] / s with s = √(v · v_corr + ε²) (`ContinuumMemoryState.scale` and
        `inputs`), built `chunk` rows at a time into reused buffers, so neither raw, s nor the
        `[N, hidden]` activation ever exists for all N rows: the same function as `direction`
        on the same values, only in bounded blocks. A block's raw inputs are
        kept feature-major (`[n_inputs, n]`, handed to the matmuls transposed): filling it is
        `n_inputs` contiguous copies instead of an interleaving one, several times faster.
        `workspace` is `(raw [n_inputs · chunk], scale [chunk], activation [chunk, hidden])`,
        reused across calls so that no step allocates (and page-faults in) large blocks.
        """
        n_rows = out.shape[0]
        n_inputs = self.skip.shape[0]
        lin_w = self.skip * coef
        w_in = (self.hidden.weight * coef).t()
        w_out = self.out.weight.reshape(-1)
        raw_buf, scale_buf, act_buf = workspace
        chunk = scale_buf.shape[0]
        for i in range(0, n_rows, chunk):
            n = min(chunk, n_rows - i)
            raw, scale, dst = raw_buf[:n_inputs * n].view(n_inputs, n), scale_buf[:n], out[i:i + n]
            torch.mul(second_moment[i:i + n], v_corr, out=scale)
            scale.add_(EPS * EPS).sqrt_()
            torch.stack([c[i:i + n] for c in columns], dim=0, out=raw)
            raw.div_(scale)
            rows = raw.t()
            torch.mv(rows, lin_w, out=dst)
            if with_hidden:
                act = act_buf[:n]
                torch.mm(rows, w_in, out=act)
                dst.addmv_(act.tanh_(), w_out)

    def regression_loss(self, features: Tensor, targets: Tensor) -> Tensor:
        """½ mean (u(x) − y)²: the memory's inner L2 objective."""
        return 0.5 * (self.forward(features) - targets).pow(2).mean()


@dataclass
class _Carry:
    """What the update rule threads from one step to the next besides the parameters."""

    states: list[ContinuumMemoryState]
    ema_loss: Tensor | None
    step: int


@dataclass
class _StepAux:
    context: Tensor
    mults: Tensor
    directions: list[Tensor]
    inputs: list[tuple[Tensor, Tensor]]  # (raw, coef) of `ContinuumMemoryState.inputs`
    scales: list[Tensor]


@dataclass
class _Pending:
    """Step t's record, completed by step t+1's gradient into a `Transition`."""

    active: list[int]
    context: Tensor
    lrs: Tensor
    directions: list[Tensor]
    samples: list[Tensor]
    features: list[Tensor]
    scales: list[Tensor]


def _sample_index(numel: int, step: int, device: torch.device) -> Tensor:
    """Deterministic strided coordinates (offset rotates with the step): no RNG to checkpoint."""
    stride = max(1, math.ceil(numel / REGRESSION_COORDS))
    return torch.arange(step % stride, numel, stride, device=device)


def _sq_norm(t: Tensor) -> Tensor:
    """‖t‖² in one pass (a dot product, not a squared copy and a sum)."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer >= {minimum}")


def _check_positive(name: str, value: object, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):  # type: ignore[operator]
        expected = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"{name}={value!r} is invalid; expected {expected}")


class DeepNestedOptimizer(torch.optim.Optimizer):
    """The nested optimizer of the port guide, usable wherever a torch optimizer is.

    `param_groups` are [core, memory] (`group_titans_params`); each group's "lr" is the base
    rate (schedulers may change it) and the effective rate is lr × the controller's multiplier.
    mode="simple": `step(loss)` records the last `k_unroll` transitions before every
    `meta_update_freq`-th step and then takes one meta-step on `SimplifiedMetaTrainer`'s
    objective. mode="explicit": call `meta_update(val_batch, loss_fn)` yourself; it unrolls
    `k_unroll` steps (`UnrolledMetaTrainer`).
    """

    def __init__(
        self,
        model: nn.Module,
        base_lr: float = 1e-3,
        meta_lr: float = 1e-4,
        k_unroll: int = 5,
        cms_frequencies: Sequence[int] = (1, 10, 100),
        momentum_hidden_dim: int = 64,
        controller_hidden_dim: int = 32,
        use_gradient_checkpointing: bool = True,
        mode: str = "simple",
        meta_update_freq: int = 100,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model={type(model).__name__} is invalid; expected a torch.nn.Module")
        _check_positive("base_lr", base_lr)
        _check_positive("meta_lr", meta_lr)
        _check_int("k_unroll", k_unroll, 1)
        freqs = list(cms_frequencies) if isinstance(cms_frequencies, (list, tuple)) else None
        if (not freqs or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in freqs)
                or any(b <= a for a, b in pairwise(freqs))):
            raise ValueError(f"cms_frequencies={cms_frequencies!r} is invalid; expected a "
                             "non-empty, strictly increasing list of integers >= 1")
        _check_int("momentum_hidden_dim", momentum_hidden_dim, 1)
        _check_int("controller_hidden_dim", controller_hidden_dim, 1)
        if not isinstance(use_gradient_checkpointing, bool):
            raise ValueError(f"use_gradient_checkpointing={use_gradient_checkpointing!r} is "
                             "invalid; expected True or False")
        if mode not in ("simple", "explicit"):
            raise ValueError(f"mode={mode!r} is invalid; expected 'simple' or 'explicit'")
        _check_int("meta_update_freq", meta_update_freq, 1)
        _check_positive("weight_decay", weight_decay, allow_zero=True)
        _check_positive("max_grad_norm", max_grad_norm)

        core, memory = group_titans_params(model)
        if not core and not memory:
            raise ValueError("model has no trainable parameters; expected at least one")
        super().__init__([{"params": core, "name": "core"}, {"params": memory, "name": "memory"}],
                         {"lr": base_lr, "weight_decay": weight_decay})

        self.model = model
        self.base_lr = base_lr
        self.meta_lr = meta_lr
        self.k_unroll = k_unroll
        self.cms_frequencies = tuple(freqs)
        self.mode = mode
        self.meta_update_freq = meta_update_freq
        self.max_grad_norm = float(max_grad_norm)

        names = {id(p): n for n, p in model.named_parameters()}
        self._params: list[nn.Parameter] = [p for g in self.param_groups for p in g["params"]]
        self._names = [names[id(p)] for p in self._params]
        self._group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        depths = [infer_param_depth(n) for n in self._names]
        n_blocks = max(max(depths) + 1, 1)
        frac = [(d + 1) / n_blocks if d >= 0 else 0.0 for d in depths]
        ref = self._params[0]
        self._group_depths = torch.tensor(
            [sum(f for f, gi in zip(frac, self._group_of, strict=True) if gi == g) /
             max(1, self._group_of.count(g)) for g in range(len(self.param_groups))],
            dtype=ref.dtype, device=ref.device)
        self._group_is_memory = torch.tensor([0.0, 1.0], dtype=ref.dtype, device=ref.device)

        skip = 1 if self.cms_frequencies[0] == 1 else 0  # fastest per-step momentum, else g
        self.momentum_mlp = L2RegressionMomentum(len(freqs) + 1, momentum_hidden_dim, skip).to(
            device=ref.device, dtype=ref.dtype)
        self.controller = NestedController(controller_hidden_dim).to(device=ref.device,
                                                                      dtype=ref.dtype)
        self.meta_optimizer = torch.optim.Adam(
            [*self.momentum_mlp.parameters(), *self.controller.parameters()], lr=meta_lr)
        self.meta_trainer = create_meta_trainer(mode, k_unroll, use_gradient_checkpointing)

        for p in self._params:
            self.state[p]["cms"] = ContinuumMemoryState.zeros_like(p.detach(), freqs)
        self.global_step = 0
        self.ema_loss: float | None = None
        self.last_meta_loss: float | None = None
        self.controller_grad_norm = 0.0
        self._mults = torch.ones(len(self.param_groups))
        self._pending: _Pending | None = None
        self._workspace: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    # ----------------------------------------------------------------- the update rule
    def _rule(self, active: list[int], params: list[Tensor], grads: list[Tensor], carry: _Carry,
              loss: Tensor | None, clip: bool) -> tuple[list[Tensor], _Carry, _StepAux]:
        """One optimizer step as a pure function of tensors (differentiable end to end)."""
        if clip:
            total = torch.sqrt(sum(_sq_norm(g) for g in grads) + EPS * EPS)  # type: ignore[arg-type]
            coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
            grads = [g * coef for g in grads]
        states = [s.advanced(g) for s, g in zip(carry.states, grads, strict=True)]
        context, mults = self._control(active, grads, loss, carry.ema_loss, carry.step)
        # A zero output layer makes the hidden path exactly zero; only an autograd graph
        # (the explicit-mode unroll) still needs it, for the gradient of that layer.
        with_hidden = torch.is_grad_enabled() or bool(self.momentum_mlp.out.weight.any())
        step_sizes = self._lrs() * mults
        new_params, directions, inputs, scales = [], [], [], []
        for i, p, g, s in zip(active, params, grads, states, strict=True):
            group = self.param_groups[self._group_of[i]]
            scale = s.scale()
            raw, coef = s.inputs(g, scale)
            u = self.momentum_mlp.direction(raw, coef, with_hidden).view_as(p)
            d = torch.add(u, p, alpha=group["weight_decay"]) if group["weight_decay"] else u
            new_params.append(torch.addcmul(p, step_sizes[self._group_of[i]], d, value=-1.0))
            directions.append(d)
            inputs.append((raw, coef))
            scales.append(scale)
        ema = carry.ema_loss
        if loss is not None:
            ema = loss if ema is None else LOSS_EMA * ema + (1.0 - LOSS_EMA) * loss
        return (new_params, _Carry(states, ema, carry.step + 1),
                _StepAux(context, mults, directions, inputs, scales))

    def _control(self, active: list[int], grads: list[Tensor], loss: Tensor | None,
                 ema_loss: Tensor | None, step: int) -> tuple[Tensor, Tensor]:
        """The controller's features and its per-group multipliers for one step."""
        ref = grads[0]
        grad_sq = torch.stack([
            sum((_sq_norm(g) for i, g in zip(active, grads, strict=True)
                 if self._group_of[i] == gi), ref.new_zeros(()))
            for gi in range(len(self.param_groups))
        ])
        context = controller_features(loss, ema_loss, grad_sq, step,
                                      self._group_depths, self._group_is_memory)
        return context, self.controller(context)

    @torch.no_grad()
    def _apply(self, active: list[int], params: list[nn.Parameter], grads: list[Tensor],
               loss: Tensor | None, ema_loss: Tensor | None, remember: bool) -> Tensor:
        """The real step, in place: `_rule(..., clip=False)` without its autograd-friendly copies.

        The same operations on the same values as `_rule` (CMS states advanced in place by
        `advanced_`, the momentum MLP run by `direction_into`, parameters updated by an
        in-place addcmul), so the real step is still the step the meta-objective differentiates.
        Returns the controller's multipliers; records the step for a meta-update if `remember`.
        """
        states = []
        for p, g in zip(params, grads, strict=True):
            state = self.state[p]["cms"].advanced_(g)
            self.state[p]["cms"] = state
            states.append(state)
        context, mults = self._control(active, grads, loss, ema_loss, self.global_step - 1)
        mlp = self.momentum_mlp
        with_hidden = bool(mlp.out.weight.any())
        step_sizes = self._lrs() * mults
        workspace = self._workspace_for(params[0], max(p.numel() for p in params))
        directions, samples, features, scales = [], [], [], []
        for i, p, g, s in zip(active, params, grads, states, strict=True):
            group = self.param_groups[self._group_of[i]]
            v_corr = 1.0 / (1.0 - BETA2 ** max(s.steps, 1))
            coef = g.new_tensor([1.0] + [1.0 / (1.0 - BETA ** n) if n else 0.0 for n in s.fires])
            columns = [g.reshape(-1), *(m.reshape(-1) for m in s.momenta)]
            # The direction is kept (a fresh tensor) only when recorded for a meta-update.
            u = g.new_empty(g.numel()) if remember else workspace[3][:g.numel()]
            mlp.direction_into(u, columns, s.second_moment.reshape(-1), v_corr, coef,
                               with_hidden, workspace[:3])
            d = u.view_as(p)
            if group["weight_decay"]:
                d.add_(p, alpha=group["weight_decay"])
            p.addcmul_(step_sizes[self._group_of[i]], d, value=-1.0)
            if remember:
                idx = _sample_index(g.numel(), self.global_step, g.device)
                scale = torch.sqrt(s.second_moment.reshape(-1)[idx] * v_corr + EPS * EPS)
                raw = torch.stack([c[idx] for c in columns], dim=-1) / scale.reshape(-1, 1)
                directions.append(d)
                samples.append(idx)
                features.append(raw * coef)
                scales.append(scale)
        if remember:
            self._pending = _Pending(active=active, context=context.detach(), lrs=self._lrs(),
                                     directions=directions, samples=samples, features=features,
                                     scales=scales)
        return mults

    def _workspace_for(self, ref: Tensor, numel: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Reused scratch of `_apply`: `direction_into`'s blocks and a direction of `numel`."""
        ws = self._workspace
        hidden = self.momentum_mlp.hidden.out_features
        if (ws is None or ws[3].numel() < numel or ws[0].device != ref.device
                or ws[0].dtype != ref.dtype):
            rows = min(MLP_CHUNK, numel)
            n_in = self.momentum_mlp.hidden.in_features
            ws = (ref.new_empty(n_in * rows), ref.new_empty(rows), ref.new_empty(rows, hidden),
                  ref.new_empty(numel))
            self._workspace = ws
        return ws

    def _lrs(self) -> Tensor:
        ref = self._params[0]
        return torch.tensor([g["lr"] for g in self.param_groups], dtype=ref.dtype,
                            device=ref.device)

    # ----------------------------------------------------------------- public API
    @torch.no_grad()
    def step(self, loss_value: float | Callable[[], float] | None = None  # type: ignore[override]
             ) -> dict[str, Any]:
        """Clip, (maybe) meta-update, and apply one nested step; returns metrics.

        `loss_value` is the training loss of the gradients being applied (a float, or a closure
        as for torch optimizers); it feeds the controller and the meta-objective's bookkeeping.
        """
        if callable(loss_value):
            with torch.enable_grad():
                loss_value = float(loss_value())
        active = [i for i, p in enumerate(self._params) if p.grad is not None]
        result: dict[str, Any] = {}
        self.global_step += 1
        if not active:
            result.update(global_step=self.global_step, lr_multipliers=self.get_lr_multipliers())
            return result
        params = [self._params[i] for i in active]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        grads = [p.grad for p in params if p.grad is not None]
        simple = isinstance(self.meta_trainer, SimplifiedMetaTrainer)
        if simple and loss_value is not None:
            assert isinstance(self.meta_trainer, SimplifiedMetaTrainer)
            self.meta_trainer.observe_loss(float(loss_value))
        if self._pending is not None:
            self._complete_pending(dict(zip(active, grads, strict=True)))
        if (isinstance(self.meta_trainer, SimplifiedMetaTrainer)
                and self.global_step % self.meta_update_freq == 0 and self.meta_trainer.ready):
            with torch.enable_grad():
                meta, parts = self.meta_trainer.meta_loss(self.momentum_mlp, self.controller)
                self._meta_step(meta)
            self.meta_trainer.clear()
            result.update(parts, meta_loss=self.last_meta_loss)

        ref = params[0]
        loss = None if loss_value is None else ref.new_tensor(float(loss_value))
        ema = None if self.ema_loss is None else ref.new_tensor(self.ema_loss)
        distance = self.meta_update_freq - self.global_step % self.meta_update_freq
        mults = self._apply(active, params, grads, loss, ema,
                            remember=simple and distance <= self.k_unroll)
        if loss is not None:
            ema = loss if ema is None else LOSS_EMA * ema + (1.0 - LOSS_EMA) * loss
        self.ema_loss = None if ema is None else float(ema)
        self._mults = mults.detach().cpu()
        result.update(global_step=self.global_step, lr_multipliers=self.get_lr_multipliers(),
                      grad_norm=float(grad_norm),
                      cms_fired=self.state[params[0]]["cms"].fired_levels())
        return result

    def _complete_pending(self, next_grads: dict[int, Tensor]) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None and isinstance(self.meta_trainer, SimplifiedMetaTrainer)
        lookahead = torch.zeros_like(pending.lrs)
        features, targets = [], []
        for j, i in enumerate(pending.active):
            g = next_grads.get(i)
            if g is None:
                continue
            lookahead[self._group_of[i]] += torch.dot(g.reshape(-1), pending.directions[j].reshape(-1))
            features.append(pending.features[j])
            targets.append(g.reshape(-1)[pending.samples[j]] / pending.scales[j])
        if features:
            self.meta_trainer.record(Transition(pending.context, pending.lrs, lookahead,
                                                torch.cat(features), torch.cat(targets)))

    def _meta_step(self, meta_loss: Tensor) -> None:
        self.meta_optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(meta_loss)
        ctrl = [p.grad for p in self.controller.parameters() if p.grad is not None]
        self.controller_grad_norm = float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in ctrl]))) if ctrl else 0.0
        torch.nn.utils.clip_grad_norm_([*self.momentum_mlp.parameters(),
                                        *self.controller.parameters()], META_GRAD_CLIP)
        self.meta_optimizer.step()
        self.last_meta_loss = float(meta_loss.detach())

    def meta_objective(self, val_batch: Any, loss_fn: LossFn | None = None,
                       train_batches: Sequence[Any] | None = None) -> tuple[Tensor, float]:
        """Explicit-mode objective: (L_val after the k_unroll-step unroll, L_val before it).

        The returned tensor is differentiable in the momentum MLP and controller parameters;
        model parameters and optimizer state are left untouched (see `meta_update`).
        """
        if not isinstance(self.meta_trainer, UnrolledMetaTrainer):
            raise RuntimeError("meta_update(val_batch) needs mode='explicit'; "
                               "mode='simple' meta-updates inside step()")
        active = list(range(len(self._params)))
        ref = self._params[0]
        ema = None if self.ema_loss is None else ref.new_tensor(self.ema_loss)
        carry = _Carry([self.state[p]["cms"] for p in self._params], ema, self.global_step)

        def rule(params: list[Tensor], grads: list[Tensor], c: _Carry, loss: Tensor
                 ) -> tuple[list[Tensor], _Carry]:
            new_params, new_carry, _ = self._rule(active, params, grads, c, loss, clip=True)
            return new_params, new_carry

        with torch.enable_grad():
            return self.meta_trainer.meta_loss(self.model, self._names, self._params, carry, rule,
                                               val_batch, loss_fn, train_batches)

    def meta_update(self, val_batch: Any, loss_fn: LossFn | None = None,
                    train_batches: Sequence[Any] | None = None) -> dict[str, float]:
        """Explicit mode: one meta-step on L_val after a k_unroll-step differentiable unroll.

        `val_batch` is `(inputs, targets)` with `loss_fn(model(inputs), targets)`, or the model's
        inputs when the model returns its loss (scalar or {"loss": ...}); inner steps use
        `train_batches` (default: `val_batch` k_unroll times). Model parameters and optimizer
        state are unchanged. Returns meta_loss (L_val after the unroll) and meta_improvement
        (after − before; negative is better).
        """
        meta, before = self.meta_objective(val_batch, loss_fn, train_batches)
        with torch.enable_grad():
            self._meta_step(meta)
        return {"meta_loss": float(meta.detach()), "meta_improvement": float(meta.detach()) - before}

    def nested_metrics(self) -> dict[str, float]:
        """The port guide's `nested/*` logging block, ready for any metrics sink."""
        mults = self.get_lr_multipliers()
        return {
            "nested/lr_multiplier_core": mults[0],
            "nested/lr_multiplier_memory": mults[1] if len(mults) > 1 else 0.0,
            "nested/meta_loss": float(self.last_meta_loss or 0.0),
            "nested/controller_grad_norm": float(self.controller_grad_norm),
            "nested/momentum_avg_norm": self.get_momentum_stats().get("momentum_avg_norm", 0.0),
        }

    def get_lr_multipliers(self) -> list[float]:
        """Latest controller multipliers, [core, memory]."""
        return [float(m) for m in self._mults]

    def get_effective_lrs(self) -> list[float]:
        """Group lr × multiplier, [core, memory]: the rates the last step actually used."""
        return [float(g["lr"]) * m for g, m in zip(self.param_groups, self.get_lr_multipliers(),
                                                    strict=True)]

    def get_momentum_stats(self) -> dict[str, float]:
        """Mean L2 norm of each CMS level's momentum over parameters (level 0 = momentum_avg_norm)."""
        stats: dict[str, float] = {}
        for level in range(len(self.cms_frequencies)):
            norms = [float(self.state[p]["cms"].momenta[level].norm()) for p in self._params]
            stats[f"level{level}_avg_norm"] = sum(norms) / len(norms)
        stats["momentum_avg_norm"] = stats["level0_avg_norm"]
        return stats

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume identically; tensors and plain values only."""
        pending = None
        if self._pending is not None:
            pk = self._pending
            pending = {"active": pk.active, "context": pk.context, "lrs": pk.lrs,
                       "directions": pk.directions, "samples": pk.samples,
                       "features": pk.features, "scales": pk.scales}
        meta_trainer = (self.meta_trainer.state_dict()
                        if isinstance(self.meta_trainer, SimplifiedMetaTrainer) else {})
        return {
            "param_groups": [{"lr": g["lr"], "weight_decay": g["weight_decay"],
                              "n_params": len(g["params"])} for g in self.param_groups],
            "state": [self._export_cms(p) for p in self._params],
            "momentum_mlp": self.momentum_mlp.state_dict(),
            "controller": self.controller.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "meta_trainer": meta_trainer,
            "pending": pending,
            "global_step": self.global_step,
            "ema_loss": self.ema_loss,
            "last_meta_loss": self.last_meta_loss,
            "controller_grad_norm": self.controller_grad_norm,
            "lr_multipliers": self._mults.clone(),
        }

    def _export_cms(self, p: Tensor) -> dict[str, Any]:
        """p's CMS state as a dict sharing its tensors; later steps copy them before updating."""
        state: ContinuumMemoryState = self.state[p]["cms"].disowned()
        self.state[p]["cms"] = state
        return state.to_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if [g["n_params"] for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("state_dict param groups do not match this model's "
                             "(core, memory) parameter counts")
        for group, saved in zip(self.param_groups, groups, strict=True):
            group["lr"], group["weight_decay"] = saved["lr"], saved["weight_decay"]
        for p, s in zip(self._params, state_dict["state"], strict=True):
            self.state[p]["cms"] = ContinuumMemoryState.from_dict(s, self.cms_frequencies)
        self.momentum_mlp.load_state_dict(state_dict["momentum_mlp"])
        self.controller.load_state_dict(state_dict["controller"])
        self.meta_optimizer.load_state_dict(state_dict["meta_optimizer"])
        if isinstance(self.meta_trainer, SimplifiedMetaTrainer):
            self.meta_trainer.load_state_dict(state_dict["meta_trainer"])
        pending = state_dict["pending"]
        self._pending = None if pending is None else _Pending(**pending)
        self.global_step = int(state_dict["global_step"])
        self.ema_loss = state_dict["ema_loss"]
        self.last_meta_loss = state_dict["last_meta_loss"]
        self.controller_grad_norm = float(state_dict["controller_grad_norm"])
        self._mults = state_dict["lr_multipliers"].clone()
