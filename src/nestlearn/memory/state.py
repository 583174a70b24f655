"""Typed state of the Titans neural memory (Titans §3.1-§3.2).

Everything the memory carries from one call to the next lives here, never in module
attributes: the chunk-start memory weights M_0 and momentum S_0 (Eq. 13), the per-token
inputs of the chunk in progress (so that streaming keeps the chunk-wise semantics of §3.2,
Eq. 16), and the caches of the short causal convolutions (§4.4). Every tensor is batched over
(batch, head). The dataclasses are frozen: a forward pass returns a new state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MemoryWeights:
    """Per-layer weights of a batch of memory MLPs; ``layers[l]`` is ``(B, H, out_l, in_l)``."""

    layers: tuple[Tensor, ...]

    def map(self, fn: Callable[[Tensor], Tensor]) -> MemoryWeights:
        return MemoryWeights(tuple(fn(w) for w in self.layers))

    def zip_map(self, other: MemoryWeights, fn: Callable[[Tensor, Tensor], Tensor]) -> MemoryWeights:
        return MemoryWeights(tuple(fn(a, b) for a, b in zip(self.layers, other.layers, strict=True)))

    def detach(self) -> MemoryWeights:
        return self.map(Tensor.detach)

    def sq_norm(self) -> Tensor:
        """Σ_l ||W^(l)||²_F per (batch, head), shape ``(B, H)``."""
        total = self.layers[0].square().sum((-2, -1))
        for w in self.layers[1:]:
            total = total + w.square().sum((-2, -1))
        return total


@dataclass(frozen=True)
class Writes:
    """Per-token inputs of the memory update (Eq. 12-13) for ``n`` tokens.

    ``k, v``: ``(B, H, n, d)``; ``theta, log_eta, log_keep``: ``(B, H, n)`` holding θ_t,
    log η_t and log(1 - α_t) (``-inf`` / ``0`` when momentum / forgetting is off).
    """

    k: Tensor
    v: Tensor
    theta: Tensor
    log_eta: Tensor
    log_keep: Tensor

    @property
    def length(self) -> int:
        return int(self.k.shape[-2])

    def _tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.k, self.v, self.theta, self.log_eta, self.log_keep

    def slice(self, start: int, end: int) -> Writes:
        k, v, theta, log_eta, log_keep = self._tensors()
        return Writes(k[..., start:end, :], v[..., start:end, :], theta[..., start:end],
                      log_eta[..., start:end], log_keep[..., start:end])

    def split(self, sizes: list[int]) -> list[Writes]:
        """Consecutive pieces of ``sizes`` tokens. Unlike many ``slice`` calls, whose backward
        zero-fills a full-length gradient per piece, the backward of a split is one ``cat``."""
        parts = [torch.split(t, sizes, dim=-1) for t in (self.theta, self.log_eta, self.log_keep)]
        return [Writes(k, v, *rest) for k, v, *rest in zip(
            torch.split(self.k, sizes, dim=-2), torch.split(self.v, sizes, dim=-2), *parts, strict=True)]

    def cat(self, other: Writes) -> Writes:
        """Concatenate along time."""
        if self.length == 0:
            return other
        if other.length == 0:
            return self
        return Writes(torch.cat([self.k, other.k], -2), torch.cat([self.v, other.v], -2),
                      torch.cat([self.theta, other.theta], -1),
                      torch.cat([self.log_eta, other.log_eta], -1),
                      torch.cat([self.log_keep, other.log_keep], -1))

    def detach(self) -> Writes:
        return Writes(*(t.detach() for t in self._tensors()))


@dataclass(frozen=True)
class MemoryStats:
    """Detached scalars for metrics: mean θ, η, α over the call's tokens, mean per-token
    surprise norm ||∇ℓ|| (before clipping) and the norm of the chunk-start momentum S_0."""

    theta: Tensor
    eta: Tensor
    alpha: Tensor
    surprise_norm: Tensor
    momentum_norm: Tensor

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in
                ("theta", "eta", "alpha", "surprise_norm", "momentum_norm")}


@dataclass(frozen=True)
class MemoryState:
    """The memory between calls.

    ``weights`` / ``momentum``: M_0 and S_0 at the start of the current chunk. ``buffer``: the
    tokens of the current chunk seen so far (their gradients are all taken at M_0).
    ``conv_cache``: the last ``kernel - 1`` pre-convolution q|k|v projections ``(B, kernel-1,
    3 * heads * head_dim)``, or ``None`` without convolutions. ``stats``: of the call that
    made it. ``current``: (M_t, S_t) with the buffered tokens applied (the paper's write,
    ``token_step``), carried by calls without autograd so that a one-token call can read it;
    ``None`` when unknown (then only a chunk start, where it is (M_0, S_0), lets a one-token
    call skip the chunk path).
    """

    weights: MemoryWeights
    momentum: MemoryWeights
    buffer: Writes
    conv_cache: Tensor | None = None
    stats: MemoryStats | None = None
    current: tuple[MemoryWeights, MemoryWeights] | None = None

    @property
    def position(self) -> int:
        """Position within the current chunk (number of buffered tokens)."""
        return self.buffer.length

    def detach(self) -> MemoryState:
        """Cut the autograd history (truncated backpropagation through time)."""
        cache = None if self.conv_cache is None else self.conv_cache.detach()
        current = None if self.current is None else (self.current[0].detach(), self.current[1].detach())
        return MemoryState(self.weights.detach(), self.momentum.detach(), self.buffer.detach(),
                           cache, self.stats, current)
