"""The minimal meta-learning demo: a small network that emits the inner learning rate and momentum.

`MetaOptimizer` (level 4) reads a context (loss, gradient norm, momentum-buffer norm) and emits
lr ∈ [1e-8, 1e-2] and momentum ∈ [0, 0.99]; `nested_training_step` trains it by differentiating
the loss after k functional heavy-ball steps of the model (levels 1-3), then applies one real
step. Parameters are never written in place before the outer backward — the unroll runs on
detached copies through `torch.func.functional_call` — which is what avoids the "modified by an
inplace operation" and "backward through the graph a second time" errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

LR_RANGE = (1e-8, 1e-2)
MOMENTUM_RANGE = (0.0, 0.99)
N_CONTEXT = 3


def make_context(loss: Tensor, grad_norm: Tensor, buffer_norm: Tensor) -> Tensor:
    """`[N_CONTEXT]` signals, log-compressed so they are O(1) whatever the loss scale."""
    return torch.stack([torch.log1p(loss.abs()), torch.log1p(grad_norm), torch.log1p(buffer_norm)])


class MetaOptimizer(nn.Module):
    """Context → (lr, momentum), clamped to LR_RANGE and MOMENTUM_RANGE.

    The lr is produced in log space (a sigmoid between log 1e-8 and log 1e-2), so the network
    moves it by factors rather than by absolute amounts; it starts at 1e-3 and momentum at 0.5.
    """

    def __init__(self, hidden_dim: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(N_CONTEXT, hidden_dim), nn.Tanh(),
                                 nn.Linear(hidden_dim, 2))
        last = self.net[2]
        assert isinstance(last, nn.Linear)
        lo, hi = math.log(LR_RANGE[0]), math.log(LR_RANGE[1])
        lr_unit = (math.log(1e-3) - lo) / (hi - lo)
        with torch.no_grad():
            last.weight.mul_(0.1)
            last.bias.copy_(torch.tensor([math.log(lr_unit / (1 - lr_unit)),
                                          math.log(0.5 / 0.49)]))

    def forward(self, context: Tensor) -> tuple[Tensor, Tensor]:
        z = self.net(context)
        lo, hi = math.log(LR_RANGE[0]), math.log(LR_RANGE[1])
        lr = torch.exp(lo + (hi - lo) * torch.sigmoid(z[..., 0]))
        momentum = MOMENTUM_RANGE[1] * torch.sigmoid(z[..., 1])
        return lr.clamp(*LR_RANGE), momentum.clamp(*MOMENTUM_RANGE)


def _norm(tensors: list[Tensor]) -> Tensor:
    return torch.sqrt(sum((t.detach() ** 2).sum() for t in tensors)  # type: ignore[arg-type]
                      + 1e-30)


def nested_training_step(
    model: nn.Module,
    meta_optimizer: MetaOptimizer,
    meta_opt: torch.optim.Optimizer,
    data: Tensor,
    target: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    buffers: dict[str, Tensor],
    k: int = 1,
    meta_grad_clip: float = 1.0,
) -> dict[str, float]:
    """One outer step: k-step differentiable unroll, meta-update, then one real update.

    Inner step j: g_j = ∇L(θ_j) (create_graph=True), (η_j, β_j) = MetaOptimizer(c_j),
    b_{j+1} = β_j b_j + g_j, θ_{j+1} = θ_j − η_j b_{j+1}. Meta-loss: L(θ_k) on the same batch.
    After the meta-step the model takes one real heavy-ball step with the updated meta-network
    (detached tensors, in place). `buffers` maps parameter names to momentum buffers and is
    updated in place (missing entries start at zero). Returns loss (before the step),
    meta_loss, lr and momentum (of the real step).
    """
    if k < 1:
        raise ValueError(f"k={k} is invalid; expected an integer >= 1")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theta = {n: p.detach().requires_grad_(True) for n, p in named.items()}
    bufs = {n: buffers.get(n, torch.zeros_like(p)).detach() for n, p in named.items()}
    first: tuple[Tensor, list[Tensor], float] | None = None
    for _ in range(k):
        loss = loss_fn(functional_call(model, theta, (data,)), target)
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
        context = make_context(loss.detach(), _norm(list(grads)), _norm(list(bufs.values())))
        if first is None:
            first = (context, [g.detach() for g in grads], float(loss.detach()))
        lr, momentum = meta_optimizer(context)
        bufs = {n: momentum * b + g for (n, b), g in zip(bufs.items(), grads, strict=True)}
        theta = {n: t - lr * bufs[n] for n, t in theta.items()}
    meta_loss = loss_fn(functional_call(model, theta, (data,)), target)
    meta_opt.zero_grad(set_to_none=True)
    torch.autograd.backward(meta_loss)
    torch.nn.utils.clip_grad_norm_(meta_optimizer.parameters(), meta_grad_clip)
    meta_opt.step()

    assert first is not None
    context, grads0, loss0 = first
    with torch.no_grad():
        lr, momentum = meta_optimizer(context)
        for (name, p), g in zip(named.items(), grads0, strict=True):
            buf = momentum * buffers.get(name, torch.zeros_like(p)) + g
            buffers[name] = buf
            p.sub_(lr * buf)
    return {"loss": loss0, "meta_loss": float(meta_loss.detach()),
            "lr": float(lr), "momentum": float(momentum)}
