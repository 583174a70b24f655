"""One chunk of self-referential Titans when both groups of memories share chunk boundaries
(Hope's own setting): the five memories as one stacked batch, as a pure function of tensors
(``aligned_chunk``) that ``compiled_chunk`` runs through ``torch.compile``, shared by the
layers of a config. Also the writes the "other" memories generate (``token_writes``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nestlearn.memory.dgd_chunk import (
    GroupState,
    MomentumDecay,
    kernel_matmul,
    kernel_option,
    read_chunk,
    update_chunk,
)
from nestlearn.memory.mlp import (
    MemoryMLPSpec,
    RankOneGrads,
    activate,
    activation_derivative,
    linear,
    mlp_forward,
)
from nestlearn.memory.self_ref_config import SelfRefTitansConfig
from nestlearn.memory.state import MemoryWeights
from nestlearn.utils.compiling import quiet_expected_fallbacks


@dataclass(frozen=True)
class TokenWrites:
    """What the "other" memories generate for a run of tokens: k_t (normalised), v_t and, when
    q is generated, q_t ``(B, H, n, d)``; η_t and log α_t ``(B, H, n)``."""

    k: Tensor
    v: Tensor
    q: Tensor | None
    eta: Tensor
    log_alpha: Tensor



def token_writes(c: SelfRefTitansConfig, other_out: Tensor, xs: Tensor, readout_weight: Tensor,
                 readout_bias: Tensor, to_k: Tensor | None, to_v: Tensor | None) -> TokenWrites:
    """``SelfRefTitans.token_writes`` as a function of its parameters (``to_k``/``to_v``: the
    weights of static k/v projections, ``None`` when generated), so that one compiled chunk
    step serves every layer of a config."""
    out = dict(zip(c.generated, other_out.unbind(-3), strict=True))
    for name, proj in (("k", to_k), ("v", to_v)):
        if proj is not None:
            b, h, n, d = xs.shape
            out[name] = F.linear(xs.transpose(-3, -2).reshape(b, n, h * d), proj).view(b, n, h, d).transpose(1, 2)
    k, v, q = out["k"], out["v"], out.get("q")
    if c.qk_norm:
        k = F.normalize(k, dim=-1)
        q = None if q is None else F.normalize(q, dim=-1)
    if c.v_norm:
        v = F.normalize(v, dim=-1)

    def logit(y: Tensor, i: int) -> Tensor:
        return (y * readout_weight[i, :, None, :]).sum(-1) + readout_bias[i, :, None]

    eta = c.eta_max * torch.sigmoid(logit(out["eta"], 0))
    log_alpha = F.logsigmoid(logit(out["alpha"], 1)) if c.weight_decay else torch.zeros_like(eta)
    return TokenWrites(k, v, q, eta, log_alpha)



ChunkOut = tuple[Tensor, Tensor, Tensor | None, tuple[Tensor, ...] | None, tuple[Tensor, ...] | None]


def aligned_chunk(c: SelfRefTitansConfig, complete: bool, weights: tuple[Tensor, ...],
                   momentum: tuple[Tensor, ...] | None, decay: tuple[Tensor, Tensor, Tensor, Tensor] | None, xs: Tensor,
                   qs: Tensor, readout_weight: Tensor, readout_bias: Tensor, to_k: Tensor | None,
                   to_v: Tensor | None) -> ChunkOut:
    """One chunk of ``SelfRefTitans._forward_aligned``: the stacked memories' chunk-start weights
    (and momenta) and the chunk's per-head inputs xs and queries qs ``(B, H, n, d)`` (q not yet
    normalised) -> M_memory's outputs ``(B, H, n, d)``, the packed writes [k, v, η, log α]
    ``(B, H, n, 2d + 2)`` of an incomplete chunk (the state keeps them) or only the detached
    [η, log α] ``(B, H, n, 2)`` of a ``complete`` one (for the stats: no gradient flows back
    through them, so none is zero-filled and back-propagated), and, for a ``complete`` chunk,
    M_memory's per-token squared inner-gradient norms and the end state.
    ``decay``: the fields of ``MomentumDecay``. A function of tensors only
    (no module), so ``compiled_chunk`` compiles it once per config."""
    # Read so that torch.compile guards on it (not an assert: ``python -O`` drops those):
    # AOTAutograd partitions the graph by the budget when it compiles, so configs that differ
    # only in it must not share a compiled graph.
    if not 0 < c.activation_budget <= 1:
        raise ValueError(f"activation_budget must be in (0, 1], got {c.activation_budget}")
    spec, n_other = c.spec(), len(c.generated)
    n = xs.shape[-2]
    if c.qk_norm:
        qs = F.normalize(qs, dim=-1)
    inp = torch.cat([xs.unsqueeze(-3).expand(*xs.shape[:-2], n_other, n, xs.shape[-1]), qs.unsqueeze(-3)], dim=-3)
    other_out, memory_out = mlp_forward(weights, inp, spec, kernel_option(c.compile)).split_with_sizes([n_other, 1], dim=-3)
    tw = token_writes(c, other_out, xs, readout_weight, readout_bias, to_k, to_v)
    o = memory_out[..., 0, :, :]
    if c.in_chunk_reads or complete:
        grads, reads = _target_grads(weights, tw.v, tw.k, spec, c.compile)
    if c.in_chunk_reads:
        o = _memory_reads(c, weights, momentum, decay, grads, reads, tw, qs)
    if not complete:
        pack = torch.cat([tw.k, tw.v, tw.eta.unsqueeze(-1), tw.log_alpha.unsqueeze(-1)], dim=-1)
        return o, pack, None, None, None
    with torch.no_grad():
        rates = torch.stack([tw.eta, tw.log_alpha], dim=-1)
    with torch.no_grad():  # a metric of M_memory's inner loop: no graph
        sq = RankOneGrads(tuple(t[..., n_other, :, :] for t in grads.deltas),
                          tuple(t[..., min(n_other, t.shape[-3] - 1), :, :] for t in grads.inputs)).sq_norm()
    new = update_chunk(GroupState(MemoryWeights(weights), None if momentum is None else MemoryWeights(momentum)),
                            grads, reads, tw.eta.unsqueeze(-2), tw.log_alpha.unsqueeze(-2),
                            None if decay is None else MomentumDecay(*decay), c.dgd, c.compile, c.step_bound,
                       c.spec(), c.curvature_step)
    return o, rates, sq, new.weights.layers, None if new.momentum is None else new.momentum.layers


def _memory_reads(c: SelfRefTitansConfig, weights: tuple[Tensor, ...], momentum: tuple[Tensor, ...] | None,
                  decay: tuple[Tensor, Tensor, Tensor, Tensor] | None, grads: RankOneGrads, pre: tuple[Tensor, ...],
                  tw: TokenWrites, qs: Tensor) -> Tensor:
    """M_memory's in-chunk reads (``read_chunk``) of the chunk's normalised queries qs, from its
    slice (the last, after the ``generated`` ones) of the stacked memories and their gradients."""
    index = len(c.generated)

    def pick(t: Tensor) -> Tensor:  # a first layer's input k is shared: size 1 on the stack dim
        return t[..., min(index, t.shape[-3] - 1), :, :]

    state = GroupState(MemoryWeights(tuple(map(pick, weights))),
                       None if momentum is None else MemoryWeights(tuple(map(pick, momentum))))
    beta = None if decay is None else MomentumDecay(*(f[:, index] for f in decay)).prefix(qs.shape[-2])
    return read_chunk(state, RankOneGrads(tuple(map(pick, grads.deltas)), tuple(map(pick, grads.inputs))),
                      tuple(map(pick, pre)), tw.eta, tw.log_alpha, beta, c.dgd, c.compile, qs, c.spec(),
                      c.curvature_step)


@functools.cache
def compiled_chunk(c: SelfRefTitansConfig, device_type: str) -> Callable[..., ChunkOut]:
    """``aligned_chunk`` of a full chunk under ``torch.compile``, one per config (``compile``)
    and device type. It compiles a few variants: the first chunk of a call from
    ``initial_state`` (zero momenta without a graph), later chunks, and no-grad (evaluation)
    calls. Every call runs under the config's ``activation_budget``, which AOTAutograd reads
    when it partitions the graph. On CPU, inductor's C++ wrapper (``cpp_wrapper``) launches the
    chunk's ~50 fused kernels and ~50 products per pass from C++ instead of Python: a chunk
    costs ~2.5 ms of fixed overhead (measured with one head), and the pilot's layer ran
    ~2.5% faster with it (interleaved runs at 2k and 4k tokens); its first compile takes ~15 s
    longer."""
    options: dict[str, str | int | bool | Callable[..., object]] | None = (
        {"cpp_wrapper": True} if device_type == "cpu" else None)
    if options is not None:
        quiet_expected_fallbacks()
    step = torch.compile(functools.partial(aligned_chunk, c, True), dynamic=False, options=options)

    def run(*args: object) -> ChunkOut:
        with torch._functorch.config.patch(activation_memory_budget=c.activation_budget):
            return step(*args)

    return run


def _target_grads(layers: tuple[Tensor, ...], v: Tensor, k: Tensor, spec: MemoryMLPSpec, kernel: bool,
                  ) -> tuple[RankOneGrads, tuple[Tensor, ...]]:
    """Closed-form gradients of ℓ = ||M(k_t) - v̂_t||² with each memory's own target v̂ = M(v_t):
    the same as ``l2_loss_grads(layers, k, mlp_forward(layers, v))``. v, k ``(B, H, n, d)``,
    shared by the memories stacked on dim -3. Also returns the pre-activations W^(l) z^(l) of
    the k reads. The v and k reads are separate products (not one on their concatenation):
    slicing a concatenation costs a zero-filled gradient of the whole per slice in backward."""
    a_v, a_k = v.unsqueeze(-3), k.unsqueeze(-3)
    inputs: list[Tensor] = []
    pre: list[Tensor] = []
    depth = len(layers)
    for i, w in enumerate(layers):
        inputs.append(a_k)  # z^(1) = k_t, shared by the stacked memories
        u_v, u_k = linear(w, a_v, kernel_option(kernel)), linear(w, a_k, kernel_option(kernel))
        pre.append(u_k)
        a_v, a_k = (activate(u_v, spec.activation), activate(u_k, spec.activation)) if i < depth - 1 else (u_v, u_k)
    diff = a_k - a_v
    delta = 2 * (diff + (k - v).unsqueeze(-3) if spec.residual else diff)
    deltas = [delta]
    for i in range(depth - 1, 0, -1):
        delta = kernel_matmul(delta, layers[i], kernel) * activation_derivative(pre[i - 1], spec.activation)
        deltas.append(delta)
    return RankOneGrads(tuple(reversed(deltas)), tuple(inputs)), tuple(pre)
