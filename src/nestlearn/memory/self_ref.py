"""Self-referential (self-modifying) Titans, the sequence layer of Hope (Nested Learning §8.1-§8.3).

Per token t, with M_□ (□ ∈ {k, v, η, α, memory}) small residual MLPs M(x) = x + W₂ σ(W₁ x)
(Eq. 89/91; ``MemoryMLPSpec(residual=True)``), whose initial weights are meta-learned
``nn.Parameter`` s, the paper's recurrence (Eq. 83-88) is

    k_t = M_k,t-1(x_t)   v_t = M_v,t-1(x_t)   η_t = M_η,t-1(x_t)   α_t = M_α,t-1(x_t)
    q_t = x_t W_q                                   (the one static projection)
    o_t = M_memory,t-1(q_t)                         (read *before* token t's write)
    v̂_□,t = M_□,t-1(v_t)                            (each memory generates its own target)
    M_□,t = M_□,t-1 (α_t I - η_t k_t k_tᵀ) - η_t ∇ℓ(M_□,t-1; k_t, v̂_□,t),   ℓ = ||M(k) - v̂||²

with q and k L2-normalised and a causal depthwise convolution (window 4) on the inputs
(§8.3). Implementation choices where the paper leaves room (see also the report):

* **Deep memories, layer by layer (DGD, Eq. 56-57).** Every linear layer W^(l) of a memory is
  a DGD learner of its own input z^(l) (z^(1) = k_t, z^(2) = σ(W^(1) k_t)): its gradient is
  δ^(l) ⊗ z^(l) (``mlp.l2_loss_grads``) and its decay is (α_t I - η^(l)_t z^(l) z^(l)ᵀ), with
  the layer's step η^(l)_t = η_t / max(1, g^(l)_t ||z^(l)_t||²) (``layer_step``, normalised
  LMS by the Gauss-Newton curvature along the token's gradient): ||z||² bounds a deeper layer's
  unnormalised input, where α - η||z||² < -1 otherwise made the memories diverge in context;
  g = ||J δ||² / ||δ||² (J: the Jacobian of the layers above; ``curvature_gains``, 1 for the
  last layer, ``curvature_step``) keeps a large second layer from multiplying the first one's
  step, which made a trained HOPE diverge past its training length. Below, η_t stands for each
  layer's η^(l)_t.
* **Momentum** (on by default, ``momentum=False`` is the paper's ablation): a learned per
  memory and head β ∈ (0, 1) with S_t = β S_{t-1} - η_t δ_t ⊗ z_t and
  W_t = W_{t-1}(α_t I - η_t z_t z_tᵀ) + S_t; with β = 0 this is exactly the equation above.
  ``dgd=False`` (ablation) replaces the DGD decay by the plain retention α_t W_{t-1}.
* **Scalar η_t, α_t.** M_η and M_α map x_t ∈ R^d to R^d like the others; the per-head scalars
  are η_t = η_max σ(⟨w_η, M_η(x_t)⟩ + b_η) > 0 and α_t = σ(⟨w_α, M_α(x_t)⟩ + b_α) ∈ (0, 1)
  with learned w, b. The inner gradient treats v̂ as a fixed target (it is "the value").
* **Heads.** x_t (after the convolution) is split into ``heads`` slices of ``head_dim``; each
  head has its own five memories; ``to_out`` projects the concatenated o_t back.

**Chunk-wise form (§8.2, Eq. 90).** With chunk size C and t' the start of t's chunk,
``t-1`` becomes ``t'`` everywhere *except* in the decay: k_t, v_t, η_t, α_t, v̂_□,t and o_t
are generated from, and every ∇ℓ is taken at, the chunk-start memories M_□,t', while
M_□,t = M_□,t-1 (α_t I - η_t k_t k_tᵀ) - η_t ∇ℓ(M_□,t'; …) still composes token by token.
M_memory has its own chunk size (``memory_chunk_size``), the other four share
``other_chunk_size``. With C = 1 it is the per-token recurrence above. ``step_bound`` (on)
scales a chunk's steps η_t by κ = min(1, 1/(2 λ̂)) per memory and layer, λ̂ bounding the
chunk's combined step along the inputs it shares (``dgd_chunk.chunk_step_scale``): the stale
chunk-start gradients otherwise pile up along aligned keys, and the chunk form diverged where
the per-token one did not. It never changes a single token's step (η <= η_max <= 0.5).

Since outputs only read chunk-start memories, a chunk needs only its end state. Per layer,
with z_i, δ_i the chunk-start inputs and gradients, γ_t = Π_{j<=t} α_j, p_t = W_{t-1} z_t
(the DGD term), and b, c the momentum coefficients of ``chunked.ChunkCoefficients``
(retention α, momentum decay β):

    W_t = γ_t W_0 + b_t S_0 - Σ_{j<=t} c_{t,j} η_j δ_j z_jᵀ - Σ_{s<=t} (γ_t/γ_s) η_s p_s z_sᵀ,
    p_t = γ_{t-1} W_0 z_t + b_{t-1} S_0 z_t - Σ_{j<t} c_{t-1,j} η_j (z_j·z_t) δ_j
          - Σ_{s<t} (γ_{t-1}/γ_s) η_s (z_s·z_t) p_s,

i.e. the within-chunk product of the (α_i I - η_i z_i z_iᵀ) is resolved *exactly* by one
unit-lower-triangular C×C solve for P = [p_t] (proof: unroll W_t = α_t W_{t-1} - η_t p_t z_tᵀ
+ S_t and substitute S_s as in ``chunked``). Everything is differentiable (the per-layer update
is ``DgdLayer``, an autograd Function whose hand-written backward is itself differentiable), so
the outer gradient flows through the in-context updates into W_q, the convolution, the readouts
and the meta-learned initial memories.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.memory import cpu_kernels
from nestlearn.memory.conv import causal_depthwise_conv
from nestlearn.memory.dgd_chunk import (
    GroupState,
    MomentumDecay,
    dgd_chunk_update,
    read_chunk,
    update_chunk,
)
from nestlearn.memory.dgd_token import decoding_applies, read_step
from nestlearn.memory.mlp import l2_loss_grads, mlp_forward
from nestlearn.memory.self_ref_chunk import TokenWrites, aligned_chunk, compiled_chunk, token_writes
from nestlearn.memory.self_ref_config import (
    COMPILE_OPTION,
    GENERATORS,
    PROJECTIONS,
    SelfRefTitansConfig,
)
from nestlearn.memory.state import MemoryStats, MemoryWeights, Writes
from nestlearn.memory.toolchain import compile_available
from nestlearn.utils.compiling import call_compiled
from nestlearn.utils.numerics import finite_or_zero

COMPILE_COST = "the self-referential layers train 1.7-2x slower"

__all__ = ["COMPILE_OPTION", "GENERATORS", "PROJECTIONS", "SelfRefState", "SelfRefTitans", "SelfRefTitansConfig",
           "TokenWrites", "chunk_scan", "self_ref_stats"]

# Initial readout biases: η ≈ η_max σ(-5) ≈ 0.0067 η_max (larger steps diverge at init, see
# ``SelfRefTitansConfig``), α = σ(6) ≈ 0.9975, β = σ(0) = 0.5.
ETA_BIAS_INIT = -5.0
ALPHA_BIAS_INIT = 6.0


@dataclass(frozen=True)
class SelfRefState:
    """Everything ``SelfRefTitans`` carries between calls.

    ``other``: chunk-start memories of the "other" group (M_k, M_v, M_η, M_α by default;
    stacked on dim -3 in ``SelfRefTitansConfig.generated`` order);
    ``other_buffer``: the per-head inputs x_t ``(B, H, p, d)`` of their current chunk.
    ``memory``: chunk-start M_memory; ``memory_buffer``: the writes of its current chunk, with
    ``Writes`` fields k_t, v_t, theta = η_t, log_eta = log β (``-inf`` without momentum),
    log_keep = log α_t. ``conv_cache``: the last ``conv_kernel - 1`` inputs ``(B, K-1, D)``.
    ``stats``: M_memory's inner loop in the call that made the state (``self_ref_stats``).
    ``read``: M_memory,t-1 with the buffered tokens applied (``dgd_token.read_step``), carried by
    one-token calls so the next one can read it; ``None`` when unknown (then only a chunk start,
    where it is ``memory``, lets one-token calls skip the chunk path).
    """

    other: GroupState
    other_buffer: Tensor
    memory: GroupState
    memory_buffer: Writes
    conv_cache: Tensor | None
    stats: MemoryStats | None = None
    read: GroupState | None = None

    def detach(self) -> SelfRefState:
        """Cut the autograd history (truncated backpropagation through time)."""
        cache = None if self.conv_cache is None else self.conv_cache.detach()
        return SelfRefState(self.other.detach(), self.other_buffer.detach(), self.memory.detach(),
                            self.memory_buffer.detach(), cache, self.stats,
                            None if self.read is None else self.read.detach())



@torch.no_grad()
def self_ref_stats(eta: Tensor, log_alpha: Tensor, log_beta: Tensor | None, surprise_sq: list[Tensor],
                   momentum: MemoryWeights | None) -> MemoryStats | None:
    """M_memory's inner loop over a call's new tokens, as the Titans memory reports it: mean
    inner learning rate η_t (``theta``), momentum decay β (``eta``), forget rate 1 - α_t
    (``alpha``), per-token inner-gradient norm ||∇ℓ|| of the completed chunks
    (``surprise_norm``) and the chunk-start momentum norm; ``None`` for a call without tokens.
    ``eta``, ``log_alpha`` ``(B, H, n)``: the new tokens' η_t and log α_t; ``log_beta``: log β of
    M_memory per head (``None`` without momentum)."""
    if eta.shape[-1] == 0:
        return None
    zero = eta.new_zeros(())
    beta = zero if log_beta is None else log_beta.exp().mean()
    surprise = torch.cat([s.flatten() for s in surprise_sq]).sqrt().mean() if surprise_sq else zero
    return MemoryStats(theta=eta.mean(), eta=beta, alpha=1 - log_alpha.exp().mean(),
                       surprise_norm=surprise,
                       momentum_norm=zero if momentum is None else momentum.sq_norm().sqrt().mean())



S = TypeVar("S")
ChunkStep = Callable[[S, int, int, int, bool], tuple[Tensor, S | None]]


def chunk_scan(state: S, total: int, buffered: int, chunk_size: int, step: ChunkStep[S],
               ) -> tuple[list[Tensor], S]:
    """Drive ``step(state, start, first, end, complete)`` over the chunks of a stream of
    ``total`` tokens whose first ``buffered`` belong to the unfinished current chunk (already
    read). ``step`` returns the outputs of tokens ``first..end`` (the new ones) and, when the
    chunk is ``complete``, the state after it."""
    outs: list[Tensor] = []
    for start in range(0, total, chunk_size):
        end = min(start + chunk_size, total)
        first = max(start, buffered)
        complete = end - start == chunk_size
        if first == end and not complete:
            break
        y, new_state = step(state, start, first, end, complete)
        outs.append(y)
        if new_state is not None:
            state = new_state
    return outs, state



class SelfRefTitans(nn.Module):
    """Self-referential Titans: ``forward(x (B, T, D), state) -> (y (B, T, D), state)``.

    One call, chunked calls with the returned state, or one token at a time give the same
    outputs and states (the state keeps chunk-start memories and partial-chunk buffers).
    """

    def __init__(self, config: SelfRefTitansConfig) -> None:
        super().__init__()
        self.config = config
        c, shapes = config, config.spec().shapes()
        self.generated = c.generated
        self.conv_weight = nn.Parameter(torch.empty(c.d_model, 1, c.conv_kernel)) if c.conv_kernel else None
        self.to_x = nn.Linear(c.d_model, c.d_model, bias=False) if c.mix_input else None
        self.to_q, self.to_k, self.to_v = (
            nn.Linear(c.d_model, c.d_model, bias=False) if name in c.static_projections else None
            for name in ("q", "k", "v"))
        self.other_init = nn.ParameterList(nn.Parameter(torch.empty(c.heads, len(self.generated), o, i))
                                           for o, i in shapes)
        self.memory_init = nn.ParameterList(nn.Parameter(torch.empty(c.heads, o, i)) for o, i in shapes)
        readouts = 2 if c.weight_decay else 1
        self.readout_weight = nn.Parameter(torch.empty(readouts, c.heads, c.head_dim))  # w_η[, w_α]
        self.readout_bias = nn.Parameter(torch.empty(readouts, c.heads))  # b_η[, b_α]
        # logit of β per head for each "other" memory, then M_memory
        self.momentum_logit = (nn.Parameter(torch.zeros(c.heads, len(self.generated) + 1))
                               if c.momentum else None)
        self.to_out = nn.Linear(c.d_model, c.d_model, bias=False)
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """Initialise what ``nn.Linear`` does not: memories, readouts, convolution and input
        mixing (identities)."""
        c = self.config
        with torch.no_grad():
            for w in (*self.other_init, *self.memory_init):
                w.normal_(0.0, c.init_scale / math.sqrt(w.shape[-1]))
            self.readout_weight.normal_(0.0, 1 / math.sqrt(c.head_dim))
            self.readout_bias[0].fill_(ETA_BIAS_INIT)
            if c.weight_decay:
                self.readout_bias[1].fill_(ALPHA_BIAS_INIT)
            if self.conv_weight is not None:
                self.conv_weight.zero_()
                self.conv_weight[..., -1] = 1.0
            if self.to_x is not None:  # mixing starts as the per-slice layer and learns from there
                self.to_x.weight.copy_(torch.eye(c.d_model))
            if self.momentum_logit is not None:
                self.momentum_logit.zero_()

    def initial_state(self, batch_size: int) -> SelfRefState:
        """The meta-learned initial memories (shared across the batch), zero momenta, no buffers."""
        c, ref = self.config, self.memory_init[0]

        def group(params: nn.ParameterList) -> GroupState:
            weights = MemoryWeights(tuple(w.expand(batch_size, *w.shape) for w in params))
            return GroupState(weights, weights.map(torch.zeros_like) if c.momentum else None)

        empty = ref.new_zeros(batch_size, c.heads, 0)
        vectors = ref.new_zeros(batch_size, c.heads, 0, c.head_dim)
        cache = ref.new_zeros(batch_size, c.conv_kernel - 1, c.d_model) if c.conv_kernel else None
        return SelfRefState(group(self.other_init), vectors, group(self.memory_init),
                            Writes(vectors, vectors, empty, empty, empty), cache)

    def log_momentum(self) -> tuple[Tensor, Tensor] | None:
        """log β of the other memories ``(H, n_other)`` and of M_memory ``(H,)``; ``None`` if off."""
        if self.momentum_logit is None:
            return None
        log_beta = F.logsigmoid(self.momentum_logit)
        return log_beta[:, :-1], log_beta[:, -1]

    def project(self, x: Tensor, conv_cache: Tensor | None, normalize_q: bool = True,
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x ``(B, T, D)`` -> per-head inputs x_t (mixed first with ``mix_input``) and static
        queries q_t = x_t W_q (``None`` when M_q generates them), both ``(B, H, T, d)``, and the
        new convolution cache.
        ``normalize_q=False`` leaves q unnormalised for a caller that normalises it per chunk."""
        c = self.config
        if self.conv_weight is not None:
            if conv_cache is None:
                raise ValueError("this layer has a convolution but the state has no conv_cache")
            padded = torch.cat([conv_cache, x], dim=1)
            conv_cache = padded[:, padded.shape[1] - (c.conv_kernel - 1):]
            x = causal_depthwise_conv(padded, self.conv_weight, COMPILE_OPTION if c.compile else None)
        b, t = x.shape[:2]
        q = None
        if self.to_q is not None:
            q = self.to_q(x).view(b, t, c.heads, c.head_dim).transpose(1, 2)
            if c.qk_norm and normalize_q:
                q = F.normalize(q, dim=-1)
        if self.to_x is not None:
            x = self.to_x(x)
        return x.view(b, t, c.heads, c.head_dim).transpose(1, 2), q, conv_cache

    def token_writes(self, other_out: Tensor, xs: Tensor) -> TokenWrites:
        """Outputs ``(B, H, n_other, n, d)`` of the "other" memories on the per-head inputs xs
        ``(B, H, n, d)`` -> the tokens' writes; a static k or v is projected from xs here."""
        return token_writes(self.config, other_out, xs, *self._write_params())

    def _write_params(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """The outer parameters ``token_writes`` reads: η/α readouts and static k, v weights."""
        return (self.readout_weight, self.readout_bias, None if self.to_k is None else self.to_k.weight,
                None if self.to_v is None else self.to_v.weight)

    def readout(self, o: Tensor) -> Tensor:
        """o ``(B, H, T, d)`` -> ``(B, T, D)``."""
        b, _, t, _ = o.shape
        y: Tensor = self.to_out(o.transpose(1, 2).reshape(b, t, self.config.d_model))
        return y

    def forward(self, x: Tensor, state: SelfRefState | None = None) -> tuple[Tensor, SelfRefState]:
        if self.config.compile and not compile_available(x.device.type, COMPILE_OPTION, COMPILE_COST):
            self.config = dataclasses.replace(self.config, compile=False)  # for this process
        c = self.config
        x = finite_or_zero(x)  # a bad input must not poison the state (utils.numerics)
        if state is None:
            state = self.initial_state(x.shape[0])
        if decoding_applies(x, state.other_buffer.shape[-2], state.memory_buffer.length, c.other_chunk_size,
                            c.memory_chunk_size, state.read is not None or not c.in_chunk_reads):
            return self._decode(x, state)
        y, new_state = self._forward_chunks(x, state)
        if torch.is_grad_enabled() or not c.in_chunk_reads or new_state.memory_buffer.length == 0:
            return y, new_state
        return y, dataclasses.replace(new_state, read=self._replay(new_state))

    def _replay(self, state: SelfRefState) -> GroupState:
        """M_memory,t-1 after the buffered tokens of an unfinished chunk, by ``read_step`` from
        the chunk-start memory: what lets the next one-token call skip the chunk path."""
        c, spec = self.config, self.config.spec()
        log_momentum = self.log_momentum()
        beta = None if log_momentum is None else log_momentum[1]
        read, w = state.memory, state.memory_buffer
        for j in range(w.length):
            read = read_step(read, state.memory, w.k[..., j:j + 1, :], w.v[..., j:j + 1, :], w.theta[..., j:j + 1],
                             w.log_keep[..., j:j + 1], beta, spec, c.dgd, c.curvature_step)
        return read

    def _forward_chunks(self, x: Tensor, state: SelfRefState) -> tuple[Tensor, SelfRefState]:
        """``forward`` through the chunk machinery (any number of tokens, with or without autograd)."""
        c, spec = self.config, self.config.spec()
        if c.compile and x.device.type == "cpu":  # before the compiled chunks, which call it
            cpu_kernels.load(COMPILE_OPTION)
        aligned = (self.to_q is not None and c.other_chunk_size == c.memory_chunk_size
                   and state.other_buffer.shape[-2] == state.memory_buffer.length)
        # the aligned path normalises q inside each (compiled) chunk: no whole-sequence passes
        xh, q, cache = self.project(x, state.conv_cache, normalize_q=not aligned)
        log_momentum = self.log_momentum()
        n_new = x.shape[1]
        if aligned:
            assert q is not None
            return self._forward_aligned(xh, q, state, log_momentum, cache)

        # The "other" memories: generate the writes of every new token, update per chunk.
        p_other = state.other_buffer.shape[-2]
        x_stream = torch.cat([state.other_buffer, xh], dim=-2)

        def other_step(group: GroupState, start: int, first: int, end: int, complete: bool,
                       ) -> tuple[Tensor, GroupState | None]:
            xs = x_stream[..., start:end, :]
            tw = self.token_writes(mlp_forward(group.weights.layers, xs.unsqueeze(-3), spec), xs)
            parts = [tw.k, tw.v, tw.eta.unsqueeze(-1), tw.log_alpha.unsqueeze(-1)]
            out = torch.cat(parts if tw.q is None else [*parts, tw.q], dim=-1)[..., first - start:, :]
            if not complete:
                return out, None
            v_hat = mlp_forward(group.weights.layers, tw.v.unsqueeze(-3), spec)
            grads = l2_loss_grads(group.weights.layers, tw.k.unsqueeze(-3), v_hat, spec)
            log_beta = None if log_momentum is None else log_momentum[0].unsqueeze(-1).expand(-1, -1, end - start)
            return out, dgd_chunk_update(group, grads, tw.eta.unsqueeze(-2), tw.log_alpha.unsqueeze(-2),
                                         log_beta, c.dgd, c.compile, c.step_bound, c.spec(), c.curvature_step)

        outs, other = chunk_scan(state.other, x_stream.shape[-2], p_other, c.other_chunk_size, other_step)
        d = c.head_dim
        width = 2 * d + 2 + (d if q is None else 0)
        packed = torch.cat(outs, dim=-2) if outs else xh.new_zeros(*xh.shape[:-1], width)
        if q is None:
            q = packed[..., 2 * d + 2:]  # generated by M_q
        eta = packed[..., 2 * d]
        log_beta = (torch.full_like(eta, -math.inf) if log_momentum is None
                    else log_momentum[1][:, None].expand_as(eta))
        writes = Writes(packed[..., :d], packed[..., d:2 * d], eta, log_beta, packed[..., 2 * d + 1])

        # M_memory: read o_t = M_memory,t'(q_t), update per chunk.
        p_mem = state.memory_buffer.length
        queries = q
        stream = state.memory_buffer.cat(writes)
        surprise: list[Tensor] = []

        def memory_step(group: GroupState, start: int, first: int, end: int, complete: bool,
                        ) -> tuple[Tensor, GroupState | None]:
            new_queries = queries[..., first - p_mem:end - p_mem, :]
            if not (complete or c.in_chunk_reads):
                return mlp_forward(group.weights.layers, new_queries, spec), None
            w = stream.slice(start, end)
            v_hat = mlp_forward(group.weights.layers, w.v, spec)
            grads = l2_loss_grads(group.weights.layers, w.k, v_hat, spec)
            decay = None if group.momentum is None else MomentumDecay.build(w.log_eta)
            o = (read_chunk(group, grads, None, w.theta, w.log_keep, decay, c.dgd, c.compile, new_queries, spec,
                            c.curvature_step)
                 if c.in_chunk_reads else mlp_forward(group.weights.layers, new_queries, spec))
            if not complete:
                return o, None
            with torch.no_grad():  # a metric: no graph
                surprise.append(grads.sq_norm())
            return o, update_chunk(group, grads, None, w.theta, w.log_keep, decay, c.dgd, c.compile,
                                   c.step_bound, spec, c.curvature_step)

        outs, memory = chunk_scan(state.memory, stream.length, p_mem, c.memory_chunk_size, memory_step)
        o = torch.cat(outs, dim=-2) if outs else q
        total_other = p_other + n_new
        new_state = SelfRefState(
            other, x_stream[..., total_other - total_other % c.other_chunk_size:, :], memory,
            stream.slice(stream.length - stream.length % c.memory_chunk_size, stream.length), cache,
            self_ref_stats(eta, writes.log_keep, None if log_momentum is None else log_momentum[1], surprise,
                           memory.momentum))
        return self.readout(o), new_state

    def _decode(self, x: Tensor, state: SelfRefState) -> tuple[Tensor, SelfRefState]:
        """``forward`` for one token that completes no chunk, without autograd (``dgd_token``):
        the token's writes from the chunk-start "other" memories, o_t from M_memory,t-1 (the
        carried read copy, or the chunk-start memory), one step of the read copy, the buffers
        grown by the token. The same equations as the chunk path, token by token."""
        c, spec = self.config, self.config.spec()
        xh, q, cache = self.project(x, state.conv_cache)
        tw = self.token_writes(mlp_forward(state.other.weights.layers, xh.unsqueeze(-3), spec), xh)
        query = q if q is not None else tw.q
        assert query is not None
        read = state.read if state.read is not None else state.memory
        o = mlp_forward(read.weights.layers, query, spec)
        log_momentum = self.log_momentum()
        beta = None if log_momentum is None else log_momentum[1]
        new_read = (read_step(read, state.memory, tw.k, tw.v, tw.eta, tw.log_alpha, beta, spec, c.dgd,
                              c.curvature_step) if c.in_chunk_reads else None)
        log_beta = torch.full_like(tw.eta, -math.inf) if beta is None else beta[:, None].expand_as(tw.eta)
        buffer = state.memory_buffer.cat(Writes(tw.k, tw.v, tw.eta, log_beta, tw.log_alpha))
        stats = self_ref_stats(tw.eta, tw.log_alpha, beta, [], state.memory.momentum)
        return self.readout(o), SelfRefState(state.other, torch.cat([state.other_buffer, xh], dim=-2), state.memory,
                                             buffer, cache, stats, new_read)

    def _forward_aligned(self, xh: Tensor, q: Tensor, state: SelfRefState,
                         log_momentum: tuple[Tensor, Tensor] | None, cache: Tensor | None,
                         ) -> tuple[Tensor, SelfRefState]:
        """``forward`` when both groups share chunk boundaries (equal chunk sizes, equally long
        buffers): the five memories M_k, M_v, M_η, M_α, M_memory run as one stacked batch
        ``(B, H, 5, out, in)``, one pass per chunk. Same equations as the general path: the
        buffered tokens' writes are regenerated from the same chunk-start memories. ``q``: the
        static queries, normalised per chunk (``aligned_chunk``)."""
        c = self.config
        n_other = len(self.generated)
        p = state.other_buffer.shape[-2]
        # (no copies of the whole sequence when nothing is buffered, as in training)
        x_stream = torch.cat([state.other_buffer, xh], dim=-2) if p else xh
        q_stream = F.pad(q, (0, 0, p, 0)) if p else q  # buffered tokens' queries are never read
        total = x_stream.shape[-2]
        chunk = c.memory_chunk_size

        def stack(other: MemoryWeights, memory: MemoryWeights) -> tuple[Tensor, ...]:
            return tuple(torch.cat([o, m.unsqueeze(-3)], dim=-3)
                         for o, m in zip(other.layers, memory.layers, strict=True))

        weights = stack(state.other.weights, state.memory.weights)
        momentum = (None if state.other.momentum is None or state.memory.momentum is None
                    else stack(state.other.momentum, state.memory.momentum))
        decay = None  # the β factors of a full chunk, shared by all of them
        if log_momentum is not None:
            log_beta = torch.cat([log_momentum[0], log_momentum[1].unsqueeze(-1)], dim=-1)  # (H, n_other + 1)
            factors = MomentumDecay.build(log_beta.unsqueeze(-1).expand(*log_beta.shape, chunk))
            decay = (factors.first, factors.ratios, factors.e_n, factors.last)
        params = self._write_params()
        compiled = compiled_chunk(c, xh.device.type) if c.compile else None
        outs: list[Tensor] = []
        surprise: list[Tensor] = []
        rates: list[Tensor] = []  # [η_t, log α_t] of the new tokens, for the stats
        tail = xh.new_zeros(*xh.shape[:-2], 0, 2 * c.head_dim + 2)  # the writes of an unfinished last chunk
        sizes = [chunk] * (total // chunk) + ([total % chunk] if total % chunk else [])
        for start, xs, qs in zip(range(0, total, chunk), x_stream.split_with_sizes(sizes, dim=-2),
                                 q_stream.split_with_sizes(sizes, dim=-2), strict=True):
            n = xs.shape[-2]
            first = max(start, p) - start
            complete = n == chunk
            if first == n and not complete:
                break
            if complete and compiled is not None:  # contiguous: strides that do not depend on T
                o, pack, sq, new_weights, new_momentum = call_compiled(
                    COMPILE_OPTION, compiled, weights, momentum, decay, xs.contiguous(), qs.contiguous(),
                    *params)
            else:
                o, pack, sq, new_weights, new_momentum = aligned_chunk(c, complete, weights, momentum, decay, xs,
                                                                        qs, *params)
            outs.append(o[..., first:, :])
            rates.append(pack[..., first:, -2:])
            if not complete:
                tail = pack[..., first:, :]
            if sq is not None and new_weights is not None:
                surprise.append(sq)
                weights, momentum = new_weights, new_momentum

        def unstack(layers: tuple[Tensor, ...] | None) -> tuple[MemoryWeights | None, MemoryWeights | None]:
            if layers is None:
                return None, None
            return (MemoryWeights(tuple(w[..., :n_other, :, :] for w in layers)),
                    MemoryWeights(tuple(w[..., n_other, :, :] for w in layers)))

        other_w, memory_w = unstack(weights)
        other_s, memory_s = unstack(momentum)
        assert other_w is not None and memory_w is not None
        d = c.head_dim
        with torch.no_grad():
            rate = torch.cat(rates, dim=-2) if rates else xh.new_zeros(*xh.shape[:-1], 2)
        # M_memory's buffer: the writes of the last chunk if unfinished, the buffered ones first
        # when that chunk began before this call (only the writes of new tokens were kept)
        start = total - total % chunk
        kept = state.memory_buffer if start < p else state.memory_buffer.slice(0, 0)
        eta_tail = tail[..., 2 * d]
        log_beta_mem = (torch.full_like(eta_tail, -math.inf) if log_momentum is None
                        else log_momentum[1][:, None].expand_as(eta_tail))
        buffer = kept.cat(Writes(tail[..., :d], tail[..., d:2 * d], eta_tail, log_beta_mem, tail[..., 2 * d + 1]))
        o = torch.cat(outs, dim=-2) if outs else q
        new_state = SelfRefState(
            GroupState(other_w, other_s), x_stream[..., start:, :], GroupState(memory_w, memory_s), buffer,
            cache, self_ref_stats(rate[..., 0], rate[..., 1], None if log_momentum is None else log_momentum[1],
                                  surprise, memory_s))
        return self.readout(o), new_state

