"""Delta Gradient Descent: gradient descent whose inner objective is L2 regression, not a dot product.

Backpropagation on a linear layer y = W x is one gradient step on <W x_t, grad_y L> (NeurIPS
Eq. 25-26). DGD replaces that by the regression ||W x_t - u_t||^2 with u_t = -grad_y L (Eq. 27;
arXiv Eq. 56 states the target's sign, the NeurIPS Eq. 27 drops it), so the step depends on what W
already maps x_t to: it first erases W's response along x_t, then writes (NeurIPS Eq. 28-29)::

    W_{t+1} = W_t (I - eta x_t x_t^T) - eta grad_y L (x) x_t                      (explicit step)

Solving the proximal problem min_W 1/2 ||W x - u||^2 + 1/(2 eta) ||W - W_t||^2 exactly instead
gives, by Sherman-Morrison, the same form with eta' = eta / (1 + eta ||x||^2), which is the arXiv
Eq. 57 eta' = eta / (1 + eta) for unit-norm inputs::

    W_{t+1} = W_t (I - eta' x_t x_t^T) - eta' grad_y L (x) x_t                     (proximal step)

The functional forms below take the layer input explicitly. The optimizer gets it from forward
hooks; see :class:`DeltaGradientDescent` for what it computes on mini-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from nestlearn.optim.closure import evaluate_closure
from nestlearn.optim.momentum import Params


def dgd_update(weight: torch.Tensor, x: torch.Tensor, grad_y: torch.Tensor,
               lr: float) -> torch.Tensor:
    """Explicit DGD step, Eq. 28-29: W (I - lr X^T X) - lr G^T X for one weight (out x in).

    ``x`` is (in,) or (n, in) and ``grad_y`` (out,) or (n, out); rows are summed, i.e. one
    gradient step on sum_t 1/2 ||W x_t - u_t||^2 (for one row exactly the paper's rule).
    """
    xs, gs = x.reshape(-1, weight.shape[1]), grad_y.reshape(-1, weight.shape[0])
    return weight - lr * ((weight @ xs.mT) @ xs + gs.mT @ xs)


def dgd_proximal_update(weight: torch.Tensor, x: torch.Tensor, grad_y: torch.Tensor,
                        lr: float) -> torch.Tensor:
    """Exact proximal DGD step: argmin_W sum_t 1/2 ||W x_t + grad_y_t||^2 + 1/(2 lr) ||W - weight||^2.

    For one input (``x`` of shape (in,)) this is the Sherman-Morrison closed form
    W (I - eta' x x^T) - eta' grad_y x^T with eta' = lr / (1 + lr ||x||^2) (arXiv Eq. 57 when
    ||x|| = 1). For (n, in) inputs it is (W - lr G^T X)(I + lr X^T X)^{-1}, solved with Cholesky.
    Unlike the explicit step it is stable for every lr.
    """
    if x.dim() == 1:
        lr_eff = lr / (1.0 + lr * float(x @ x))
        return weight - lr_eff * (torch.outer(weight @ x, x) + torch.outer(grad_y, x))
    xs, gs = x.reshape(-1, weight.shape[1]), grad_y.reshape(-1, weight.shape[0])
    return _proximal_solve(weight - lr * gs.mT @ xs, xs.mT @ xs, lr)


def _proximal_solve(rhs: torch.Tensor, second_moment: torch.Tensor, lr: float) -> torch.Tensor:
    """rhs (I + lr C)^{-1} for a symmetric PSD C, via Cholesky of the SPD matrix I + lr C."""
    eye = torch.eye(second_moment.shape[0], dtype=second_moment.dtype, device=second_moment.device)
    chol = torch.linalg.cholesky(eye + lr * second_moment)
    return torch.cholesky_solve(rhs.mT, chol).mT


class DeltaGradientDescent(torch.optim.Optimizer):
    """DGD (NeurIPS Eq. 27-29, arXiv Eq. 56-57) as a drop-in optimizer for linear layers.

    The rule needs each layer's input, which an optimizer does not see: call :meth:`watch` once
    with the model and forward hooks on its ``nn.Linear`` modules record, for each managed
    weight, C = mean over all input rows x of x x^T since the last step (rows of every forward
    call with grad enabled, so gradient accumulation and checkpoint recomputation average
    correctly). :meth:`record_input` does the same for weights used outside ``nn.Linear``. Then,
    with G = p.grad::

        W' = W (1 - lr wd)                                    (decoupled weight decay)
        W <- W' - lr (decay W' C + G)                         (explicit, default)
        W <- (W' - lr G) (I + lr decay C)^{-1}                (proximal=True)

    This is exactly the DGD step on the mini-batch objective mean_t 1/2 ||W x_t - u_t||^2 with
    u_t = -N grad_{y_t} L, which is the per-row surprise when L is the mean loss over the N rows:
    the batched form of Eq. 28 (sequential per-token application is what :func:`dgd_update`
    offers). For one row it is Eq. 28 itself; the proximal form is its Sherman-Morrison solution.

    What it converges to (tested): the explicit step is exactly gradient descent on
    L(W) + decay/2 * mean_t ||W x_t||^2, so its fixed points satisfy grad L = -decay W C, not
    grad L = 0. For a linear regression onto targets y it settles at W x = y / (1 + decay), i.e.
    halfway with the paper's decay = 1. That bias is the point inside HOPE (forgetting along the
    current keys); as an outer optimizer lower ``decay`` (0 gives SGD) trades it away.

    Params without a recorded input (biases, gains, embeddings, weights of un-watched modules)
    have x = 0 in the rule, which reduces it to SGD, Eq. 25: ``W <- W (1 - lr wd) - lr G``.
    A weight shared with a non-Linear use (tied embeddings) gets C from its Linear use only.
    The explicit step needs lr * lambda_max(C) < 2 for the decay to contract; proximal always
    contracts (costs a Cholesky of in x in per weight and step).

    Args:
        lr: eta.
        decay: strength of the input-dependent decay (1 in the paper's Eq. 28 / arXiv Eq. 57).
        weight_decay: decoupled decay.
        proximal: use the exact proximal (implicit) step.
    """

    def __init__(self, params: Params, lr: float = 1e-2, decay: float = 1.0,
                 weight_decay: float = 0.0, proximal: bool = False) -> None:
        if lr < 0.0 or decay < 0.0 or weight_decay < 0.0:
            raise ValueError("need lr >= 0, decay >= 0 and weight_decay >= 0")
        super().__init__(params, {"lr": lr, "decay": decay, "weight_decay": weight_decay,
                                  "proximal": proximal})
        self._inputs: dict[torch.Tensor, tuple[torch.Tensor, int]] = {}
        self._hooks: list[RemovableHandle] = []

    def _managed(self) -> set[torch.Tensor]:
        return {p for group in self.param_groups for p in group["params"]}

    def record_input(self, weight: torch.Tensor, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (..., in) to the input statistic of ``weight`` (out x in)."""
        rows = x.detach().reshape(-1, weight.shape[-1])
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        rows = rows.to(dtype)
        outer = rows.mT @ rows
        if weight in self._inputs:
            total, count = self._inputs[weight]
            outer = outer + total
            rows_seen = count + rows.shape[0]
        else:
            rows_seen = rows.shape[0]
        self._inputs[weight] = (outer, rows_seen)

    def watch(self, model: nn.Module) -> DeltaGradientDescent:
        """Hook every ``nn.Linear`` of ``model`` whose weight this optimizer manages."""
        managed = self._managed()
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.weight in managed:
                self._hooks.append(module.register_forward_hook(self._hook))
        return self

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.is_grad_enabled():
            assert isinstance(module, nn.Linear)
            self.record_input(module.weight, args[0])

    def remove_hooks(self) -> None:
        """Detach the hooks installed by :meth:`watch`."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                stat = self._inputs.pop(p, None)
                if p.grad is None:
                    continue
                p.mul_(1.0 - lr * group["weight_decay"])
                if stat is None:
                    p.add_(p.grad, alpha=-lr)
                    continue
                c = (stat[0] * (group["decay"] / stat[1])).to(p.dtype)
                if group["proximal"]:
                    p.copy_(_proximal_solve(p - lr * p.grad, c, lr))
                else:
                    p.sub_(lr * (p @ c + p.grad))
        self._inputs.clear()
        return loss
