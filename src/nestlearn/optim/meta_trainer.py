"""Meta-trainers: the objectives that train the momentum MLP and the LR controller.

Two objectives, one per optimizer mode:

* `SimplifiedMetaTrainer` (mode "simple") needs nothing but what `step()` sees. It keeps a
  window of recorded transitions t → t+1 and minimises

      J = Σ_t Σ_G −lr_G,t · mult_G(c_t) · ⟨g_{t+1}, d_t⟩_G          (controller)
        + mean_t ½ ‖u_φ(x_t) − g_{t+1} / s_t‖²                     (momentum MLP)

  The first term is the first-order change of the loss caused by step t,
  L(θ_t − η d_t) − L(θ_t) ≈ −η ⟨∇L(θ_{t+1}), d_t⟩ (the hypergradient of Baydin et al., with
  the gradient at θ_{t+1} measured by the next step): summed over the window it is the predicted
  loss improvement, and its derivative in the controller parameters is exact to first order —
  no extra forward pass, no REINFORCE variance. The second term is the deep-momentum memory's L2
  regression: the MLP maps (normalised gradient, CMS momenta) x_t to a direction u that should
  match the next normalised gradient. It is the same first-order lookahead, −⟨ĝ_{t+1}, u⟩, plus
  the proximal term ½‖u‖² that keeps the direction bounded (dot-product objective + L2 = delta
  rule, as in the paper); standard momentum is its solution for a constant memory.
* `UnrolledMetaTrainer` (mode "explicit") differentiates the true objective
  J = L_val(θ_{t+k}) through k functional optimizer steps (`torch.func.functional_call`,
  `create_graph=True`, optional activation checkpointing of each inner forward).

A batch is `(inputs, targets)` scored by `loss_fn(model(inputs), targets)`, or, without a
`loss_fn`, the model's inputs (a tensor or a tuple of positional arguments) with the model
returning the loss (a scalar tensor or a dict with key "loss").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from nestlearn.optim.controller import NestedController
    from nestlearn.optim.deep_nested import L2RegressionMomentum

LossFn = Callable[[Any, Any], Tensor]
C = TypeVar("C")
UpdateRule = Callable[[list[Tensor], list[Tensor], C, Tensor], tuple[list[Tensor], C]]
"""(params, grads, carry, loss) → (new params, new carry): one differentiable optimizer step."""


def batch_loss(model: nn.Module, params: dict[str, Tensor], batch: Any,
               loss_fn: LossFn | None) -> Tensor:
    """Scalar loss of `batch` under `params` (see the module docstring for what a batch is)."""
    if loss_fn is not None:
        inputs, targets = batch
        return loss_fn(functional_call(model, params, (inputs,)), targets)
    args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    out = functional_call(model, params, args)
    loss = out["loss"] if isinstance(out, dict) else out
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("without loss_fn the model must return a scalar loss or {'loss': ...}; "
                         "pass loss_fn to score (inputs, targets) batches")
    return loss.reshape(())


@dataclass
class Transition:
    """One recorded step t → t+1 of the simple mode (tensors only, so it checkpoints safely)."""

    context: Tensor  # [G, F] controller input at step t
    lrs: Tensor  # [G] group base learning rates at step t
    lookahead: Tensor  # [G] ⟨g_{t+1}, d_t⟩ per group, d_t the direction applied at step t
    features: Tensor  # [M, L+1] sampled momentum-MLP inputs x_t
    targets: Tensor  # [M] next gradient at the same coordinates, normalised by s_t

    def to_dict(self) -> dict[str, Tensor]:
        return {"context": self.context, "lrs": self.lrs, "lookahead": self.lookahead,
                "features": self.features, "targets": self.targets}

    @classmethod
    def from_dict(cls, data: dict[str, Tensor]) -> Transition:
        return cls(data["context"], data["lrs"], data["lookahead"], data["features"],
                   data["targets"])


class SimplifiedMetaTrainer:
    """Window of transitions and the first-order lookahead + L2 regression objective."""

    def __init__(self, window_size: int = 5) -> None:
        if window_size < 1:
            raise ValueError(f"window_size={window_size} is invalid; expected an integer >= 1")
        self.window_size = window_size
        self.window: deque[Transition] = deque(maxlen=window_size)
        self.losses: deque[float] = deque(maxlen=window_size + 1)

    @property
    def ready(self) -> bool:
        return len(self.window) > 0

    def record(self, transition: Transition) -> None:
        self.window.append(transition)

    def observe_loss(self, loss: float) -> None:
        self.losses.append(loss)

    def observed_change(self) -> float:
        """Measured loss change over the window (last − first), to compare with the prediction."""
        return self.losses[-1] - self.losses[0] if len(self.losses) > 1 else 0.0

    def meta_loss(self, momentum: L2RegressionMomentum,
                  controller: NestedController) -> tuple[Tensor, dict[str, float]]:
        """J = predicted loss change over the window + mean L2 regression loss (see module doc)."""
        lookahead = torch.stack([
            -(t.lrs * controller(t.context) * t.lookahead).sum() for t in self.window
        ]).sum()
        regression = torch.stack([
            momentum.regression_loss(t.features, t.targets) for t in self.window
        ]).mean()
        parts = {"meta_lookahead": float(lookahead.detach()),
                 "meta_regression": float(regression.detach()),
                 "observed_change": self.observed_change()}
        return lookahead + regression, parts

    def clear(self) -> None:
        self.window.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"window": [t.to_dict() for t in self.window], "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = deque((Transition.from_dict(t) for t in state["window"]),
                            maxlen=self.window_size)
        self.losses = deque(state["losses"], maxlen=self.window_size + 1)


class UnrolledMetaTrainer:
    """k-step differentiable unroll: J = L_val(θ_{t+k}) with θ_{j+1} = rule(θ_j, ∇L(θ_j))."""

    def __init__(self, k_steps: int = 5, use_checkpointing: bool = True) -> None:
        if k_steps < 1:
            raise ValueError(f"k_steps={k_steps} is invalid; expected an integer >= 1")
        self.k_steps = k_steps
        self.use_checkpointing = use_checkpointing

    def _loss(self, model: nn.Module, names: Sequence[str], theta: Sequence[Tensor],
              batch: Any, loss_fn: LossFn | None) -> Tensor:
        def run(*values: Tensor) -> Tensor:
            return batch_loss(model, dict(zip(names, values, strict=True)), batch, loss_fn)

        if self.use_checkpointing and torch.is_grad_enabled():
            # Recompute inner activations in backward: memory O(k · params), not O(k · acts).
            out = checkpoint(run, *theta, use_reentrant=False)
            assert isinstance(out, Tensor)
            return out
        return run(*theta)

    def meta_loss(self, model: nn.Module, names: Sequence[str], params: Sequence[Tensor],
                  carry: C, rule: UpdateRule[C], val_batch: Any, loss_fn: LossFn | None = None,
                  train_batches: Sequence[Any] | None = None) -> tuple[Tensor, float]:
        """Return (L_val after the unroll, L_val before it as a float).

        Inner steps use `train_batches` (default: `val_batch` k_steps times). Parameters are
        never written: the unroll runs on detached copies through `functional_call`.
        """
        batches = list(train_batches) if train_batches is not None else [val_batch] * self.k_steps
        if not batches:
            raise ValueError("train_batches is empty; expected at least one batch to unroll")
        theta = [p.detach().requires_grad_(True) for p in params]
        with torch.no_grad():
            before = float(batch_loss(model, dict(zip(names, theta, strict=True)), val_batch,
                                      loss_fn))
        for batch in batches:
            loss = self._loss(model, names, theta, batch, loss_fn)
            raw = torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g for g, t in zip(raw, theta, strict=True)]
            theta, carry = rule(theta, grads, carry, loss)
        return self._loss(model, names, theta, val_batch, loss_fn), before


def create_meta_trainer(mode: str, k_unroll: int = 5, use_checkpointing: bool = True
                        ) -> SimplifiedMetaTrainer | UnrolledMetaTrainer:
    """'simple' → SimplifiedMetaTrainer(window k_unroll); 'explicit' → UnrolledMetaTrainer."""
    if mode == "simple":
        return SimplifiedMetaTrainer(window_size=k_unroll)
    if mode == "explicit":
        return UnrolledMetaTrainer(k_steps=k_unroll, use_checkpointing=use_checkpointing)
    raise ValueError(f"mode={mode!r} is not known; expected 'simple' or 'explicit'")
