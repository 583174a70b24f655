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
  the layer's step η^(l)_t = η_t / max(1, ||z^(l)_t||²) (``layer_step``, as in normalised LMS):
  η_t itself on the unit-norm k of the first layer, bounded on a deeper layer's unnormalised
  input, where α - η||z||² < -1 otherwise made the memories diverge in context. Below, η_t
  stands for each layer's η^(l)_t.
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
``other_chunk_size``. With C = 1 it is the per-token recurrence above.

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
is ``_DgdLayer``, an autograd Function whose hand-written backward is itself differentiable), so
the outer gradient flows through the in-context updates into W_q, the convolution, the readouts
and the meta-learned initial memories.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.memory import cpu_kernels
from nestlearn.memory.chunked import segment_sums
from nestlearn.memory.conv import causal_depthwise_conv
from nestlearn.memory.mlp import (
    Activation,
    MemoryMLPSpec,
    RankOneGrads,
    activate,
    activation_derivative,
    l2_loss_grads,
    linear,
    mlp_forward,
)
from nestlearn.memory.state import MemoryStats, MemoryWeights, Writes
from nestlearn.utils.compiling import call_compiled

GENERATORS = ("k", "v", "q", "eta", "alpha")
"""The memories the "other" group can hold, in the order they are stacked (dim -3 of their
weights); ``SelfRefTitansConfig.generated`` says which a layer has."""
PROJECTIONS = ("k", "v", "q")
"""The inputs that may instead be static projections x_t W (``static_projections``)."""

COMPILE_OPTION = "model.self_ref.compile"
"""The config switch that ``call_compiled`` names when a compiled step fails to build."""

# Initial readout biases: η ≈ η_max σ(-5) ≈ 0.0067 η_max (larger steps diverge at init, see
# ``SelfRefTitansConfig``), α = σ(6) ≈ 0.9975, β = σ(0) = 0.5.
ETA_BIAS_INIT = -5.0
ALPHA_BIAS_INIT = 6.0


@dataclass(frozen=True)
class SelfRefTitansConfig:
    """Options of ``SelfRefTitans``; each switches one term of the equations (module docstring).

    ``d_model`` must equal ``heads * head_dim`` (each head reads its slice of x_t).
    ``depth``/``expansion``/``activation``: every memory M_□ (residual, Eq. 91).
    ``memory_chunk_size`` / ``other_chunk_size``: C of M_memory / of M_k, M_v, M_η, M_α.
    ``momentum``: learned-β momentum inside every memory; ``dgd``: the (α I - η z zᵀ) decay
    (``False``: plain retention α W). ``qk_norm``: L2-normalise q and k. ``v_norm``: L2-normalise
    v too: not in the paper, but ``hope`` sets it (``model.self_ref.v_norm``), since without it the
    self-generated targets v̂ = M(v) feed back and, on unit-scale inputs at this initialisation,
    the memories overflow in context (white noise at the pilot's width: outputs ~1e18 after 256
    tokens, NaN by 1024); leave it off only with inputs and steps that keep v small. ``conv_kernel``:
    causal depthwise convolution of the inputs, 0 disables. ``eta_max``: bound of η_t.
    ``init_scale``: initial memory weights are N(0, init_scale² / fan_in). ``mix_input``: a
    learned d × d projection of x_t (after the convolution) before the head split, so that each
    head's memories read the whole token, as the paper's M_□: R^d -> R^d do; off, each head's
    memories read only its d/H slice of x_t and see the other heads' features only through
    ``to_out`` and the next layer (the static q is projected from the whole token either way).

    Ablations of the paper's table: ``static_projections`` lists which of k, v, q are static
    projections x_t W (moved to the lowest-frequency level: learned by the outer loop only)
    instead of the output of an in-context memory M_k, M_v, M_q; Hope's own is ``("q",)``
    (Eq. 84), ``()`` generates q by a memory M_q too. ``weight_decay=False`` fixes α_t ≡ 1 (no
    M_α): the DGD decay becomes (I - η_t k_t k_tᵀ), the plain step W + S.

    ``compile``: run each full chunk of the aligned path (equal chunk sizes, static q: Hope's
    own setting) through ``torch.compile``, which fuses the many elementwise passes over the
    ``(B, H, 5, C, C)`` and ``(B, H, 5, d, d)`` tensors of forward and backward (1.7× at 2
    threads, 2× at 1 on a 2-core CPU). Layers of one config share one compiled step; the first
    call compiles it (seconds to a minute, cached on disk by inductor). On CPU it also solves
    the DGD systems, in every path, with nestlearn's C++ kernel (``cpu_kernels``: built on
    first use, 10-40 s, cached; 1.13× on the pilot's layer), and makes the memories' small
    products (the compiled chunk's and the DGD update's) with its batched matmul (1.11-1.12× on
    the pilot's layer at budgets 0.5-1.0 on a Zen 4 CPU, none at 0.2). Its backward cannot
    itself be differentiated (``create_graph``): leave it off for meta-objectives through the
    model. ``activation_budget`` (with ``compile``): the fraction of the compiled chunk's
    activations kept for backward (``torch._functorch.config.activation_memory_budget``);
    below 1 the partitioner recomputes the cheapest of the rest in backward. The saved
    activations are what limit sequence length: at the pilot's width (8 heads of 64), per token
    and layer, 322 KB with 1.0, 185 KB with 0.5 and 63 KB with 0.2 (the layer ~1.04× and ~1.18×
    slower than at 1.0 with the C++ products on a Zen 4 CPU).
    """

    d_model: int
    heads: int = 4
    head_dim: int = 64
    depth: int = 2
    expansion: float = 1.0
    activation: Activation = "silu"
    memory_chunk_size: int = 64
    other_chunk_size: int = 64
    momentum: bool = True
    dgd: bool = True
    qk_norm: bool = True
    v_norm: bool = False
    conv_kernel: int = 4
    eta_max: float = 0.5
    init_scale: float = 1.0
    static_projections: tuple[str, ...] = ("q",)
    weight_decay: bool = True
    mix_input: bool = False
    compile: bool = False
    activation_budget: float = 1.0

    def __post_init__(self) -> None:
        for name in ("d_model", "heads", "head_dim", "memory_chunk_size", "other_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.heads * self.head_dim != self.d_model:
            raise ValueError(f"d_model ({self.d_model}) must equal heads * head_dim "
                             f"({self.heads} * {self.head_dim})")
        if self.conv_kernel < 0:
            raise ValueError(f"conv_kernel must be >= 0, got {self.conv_kernel}")
        if self.eta_max <= 0:
            raise ValueError(f"eta_max must be > 0, got {self.eta_max}")
        if self.init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale}")
        if not 0 < self.activation_budget <= 1:
            raise ValueError(f"activation_budget must be in (0, 1], got {self.activation_budget}")
        static = self.static_projections
        if len(set(static)) != len(static) or not set(static) <= set(PROJECTIONS):
            raise ValueError(f"static_projections must be distinct names among {PROJECTIONS}, "
                             f"got {static!r}")
        self.spec()  # validates depth, expansion, activation

    def spec(self) -> MemoryMLPSpec:
        return MemoryMLPSpec(self.head_dim, self.depth, self.expansion, self.activation, residual=True)

    @property
    def generated(self) -> tuple[str, ...]:
        """The in-context memories of the "other" group, in stacking order."""
        return tuple(n for n in GENERATORS if n not in self.static_projections
                     and (n != "alpha" or self.weight_decay))


@dataclass(frozen=True)
class TokenWrites:
    """What the "other" memories generate for a run of tokens: k_t (normalised), v_t and, when
    q is generated, q_t ``(B, H, n, d)``; η_t and log α_t ``(B, H, n)``."""

    k: Tensor
    v: Tensor
    q: Tensor | None
    eta: Tensor
    log_alpha: Tensor


@dataclass(frozen=True)
class GroupState:
    """Chunk-start weights W_0 of a group of memories (``(B, H[, 4], out, in)`` per layer) and
    their momenta S_0 (``None`` without momentum)."""

    weights: MemoryWeights
    momentum: MemoryWeights | None

    def detach(self) -> GroupState:
        return GroupState(self.weights.detach(), None if self.momentum is None else self.momentum.detach())


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
    """

    other: GroupState
    other_buffer: Tensor
    memory: GroupState
    memory_buffer: Writes
    conv_cache: Tensor | None
    stats: MemoryStats | None = None

    def detach(self) -> SelfRefState:
        """Cut the autograd history (truncated backpropagation through time)."""
        cache = None if self.conv_cache is None else self.conv_cache.detach()
        return SelfRefState(self.other.detach(), self.other_buffer.detach(), self.memory.detach(),
                            self.memory_buffer.detach(), cache, self.stats)


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


def dgd_chunk_update(state: GroupState, grads: RankOneGrads, eta: Tensor, log_alpha: Tensor,
                     log_beta: Tensor | None, dgd: bool, kernel: bool = False) -> GroupState:
    """State after one chunk of n tokens of Eq. 90 (module docstring), all gradients ``grads``
    taken at the chunk start. ``eta``, ``log_alpha``, ``log_beta`` ``(..., n)`` broadcast
    against the weights' leading dims; ``log_beta`` is ignored without momentum. ``kernel``:
    solve the DGD systems of CPU tensors with ``cpu_kernels`` (``_solve``)."""
    momentum = None if log_beta is None or state.momentum is None else _MomentumDecay.build(log_beta)
    return _dgd_chunk_update(state, grads, None, eta, log_alpha, momentum, dgd, kernel)


def layer_step(eta: Tensor, z: Tensor) -> Tensor:
    """The step of a layer with inputs z ``(..., n, in)``: η_t / max(1, ||z_t||²) ``(..., n)``.

    Normalised by the input energy as in normalised LMS: the DGD factor (α I - η z zᵀ) has the
    eigenvalue α - η||z||² along z, which leaves (-1, 1) once η||z||² > 1 + α. A first layer
    reads the unit-norm k (``qk_norm``) and keeps η_t exactly; a deeper layer's input
    σ(W k) is not normalised and, without this, its memory diverged in context (HOPE at outer
    lr 3e-3: ||z||² up to ~3,000 at η = 0.1). With the bound, |α - η'||z||²| < 1 for η <= 1."""
    return eta / z.square().sum(-1).clamp(min=1.0)


def _dgd_chunk_update(state: GroupState, grads: RankOneGrads, reads: tuple[Tensor, ...] | None,
                      eta: Tensor, log_alpha: Tensor, momentum: _MomentumDecay | None, dgd: bool,
                      kernel: bool) -> GroupState:
    """``dgd_chunk_update`` with the β factors built; ``reads``, when given, are the chunk-start
    reads W^(l)_0 z^(l) ``(..., n, out_l)`` (the pre-activations the gradient already computed)."""
    if state.momentum is not None and momentum is None:
        raise ValueError("a group with momentum needs its momentum decay")
    decays = _ChunkDecays.build(log_alpha, momentum if state.momentum is not None else None, kernel)
    s0s = (None,) * len(state.weights.layers) if state.momentum is None else state.momentum.layers
    ws: list[Tensor] = []
    ss: list[Tensor] = []
    for layer, (w0, s0, delta, z) in enumerate(zip(state.weights.layers, s0s, grads.deltas, grads.inputs,
                                                   strict=True)):
        co = decays.coefficients(layer_step(eta, z), dgd)
        w, s = _dgd_layer(w0, s0, delta, z, None if reads is None else reads[layer], co, kernel)
        ws.append(w)
        if s is not None:
            ss.append(s)
    return GroupState(MemoryWeights(tuple(ws)), None if state.momentum is None else MemoryWeights(tuple(ss)))


@dataclass(frozen=True)
class _MomentumDecay:
    """The factors of a chunk that depend on the momentum decay β alone, with E_s = Π_{j<=s} β_j
    (s = 1..n): ``first`` = E_s ``(..., n, 1)``, ``ratios`` [s, i] = E_s / E_i ``(..., n, n)``,
    ``e_n`` = E_n ``(..., 1, 1)`` and ``last`` = E_n / E_j ``(..., n)``. β is constant over a
    call, so one build serves every full chunk. Separate tensors, not views of one: as inputs of
    the compiled chunk each gets its own gradient (a shared one was assembled by a layout-changing
    copy, ~0.3 ms per chunk at the pilot's shape)."""

    first: Tensor
    ratios: Tensor
    e_n: Tensor
    last: Tensor

    @staticmethod
    def build(log_beta: Tensor) -> _MomentumDecay:
        n = log_beta.shape[-1]
        rows = segment_sums(log_beta).exp().split_with_sizes([1, n], dim=-2)[1]  # [s, 0] = E_s, [s, i] = E_s / E_i
        first, ratios = rows.split_with_sizes([1, n], dim=-1)
        e_n, last = rows[..., -1, :].split_with_sizes([1, n], dim=-1)
        return _MomentumDecay(first.contiguous(), ratios.contiguous(), e_n.unsqueeze(-1).contiguous(),
                              last.contiguous())


def _segment_differences(x: Tensor) -> Tensor:
    """``chunked.segment_sums(x)`` as differences of running sums, P_s - P_i with P_s = Σ_{j<=s}
    x_j: one running sum over (..., n) instead of one per column of an (n+1)×(n+1) matrix,
    which inductor leaves to a strided library call (twice per chunk, ~90 µs each at the pilot's
    shape). The differences lose |P_s|·eps of absolute precision: with x = log α_t this is a
    relative error of ~|Σ log α|·1e-7 in the decays in float32, far below that of the products."""
    n = x.shape[-1]
    running = F.pad(x.cumsum(-1), (1, 0))  # P_0 = 0 (the chunk start)
    ones = torch.ones(n + 1, n + 1, dtype=torch.bool, device=x.device)
    return (running.unsqueeze(-1) - running.unsqueeze(-2)).masked_fill(~torch.tril(ones), float("-inf"))


@dataclass(frozen=True)
class _ChunkDecays:
    """The factors of a chunk that do not depend on η: with γ_t and the extended momentum sums
    c_{t,j}, b_t of ``chunked.ChunkCoefficients`` indexed from t = 0 (the chunk start, c_0 = b_0
    = 0), one (n+1)×n product gives every c, and b is its first column times E_1 (parts taken
    with ``split``: the backward of a slice would zero-fill the whole matrix per slice). Built
    once per chunk and scaled by each layer's own step (``coefficients``)."""

    gamma_n: Tensor  # γ_n, (..., 1, 1)
    gamma_prev: Tensor  # γ_{t-1}, (..., n, 1)
    decay_prev: Tensor  # γ_{t-1}/γ_s, (..., n, n)
    decay_last: Tensor  # γ_n/γ_s, (..., 1, n)
    c_prev: Tensor  # c_{t-1,j}, (..., n, n)
    c_last: Tensor  # c_{n,j}, (..., 1, n)
    b_prev: Tensor | None  # b_{t-1}, (..., n, 1)
    b_n: Tensor | None  # b_n, (..., 1, 1)
    momentum: _MomentumDecay | None

    @staticmethod
    def build(log_alpha: Tensor, momentum: _MomentumDecay | None, kernel: bool = False) -> _ChunkDecays:
        n = log_alpha.shape[-1]
        # [t, 0] = γ_t, [t, s] = γ_t / γ_s for t = 0..n (0 = chunk start)
        gamma, decay = _segment_differences(log_alpha).exp().split_with_sizes([1, n], dim=-1)
        gamma_prev, gamma_n = gamma.split_with_sizes([n, 1], dim=-2)
        decay_prev, decay_last = decay.split_with_sizes([n, 1], dim=-2)
        if momentum is None:  # c_{t,j} = γ_t / γ_j without momentum
            return _ChunkDecays(gamma_n, gamma_prev, decay_prev, decay_last, decay_prev, decay_last, None, None, None)
        # c_{t,j} = Σ_s (γ_t/γ_s)(E_s/E_j), and b_t = Σ_s (γ_t/γ_s) E_s = E_1 c_{t,1}: an n-wide
        # product instead of an (n+1)-wide one (1.3× faster at n = 64: 65 wide misfits the kernel)
        c = _matmul(decay, momentum.ratios, kernel)
        b = c.split_with_sizes([1, n - 1], dim=-1)[0] * momentum.first.split_with_sizes([1, n - 1], dim=-2)[0]
        b_prev, b_n = b.split_with_sizes([n, 1], dim=-2)
        c_prev, c_last = c.split_with_sizes([n, 1], dim=-2)
        return _ChunkDecays(gamma_n, gamma_prev, decay_prev, decay_last, c_prev, c_last, b_prev, b_n, momentum)

    def coefficients(self, eta: Tensor, dgd: bool) -> _DgdCoefficients:
        """The factors of one layer whose tokens take the steps η ``(..., n)``."""
        eta_cols = eta.unsqueeze(-2)
        m = self.momentum
        return _DgdCoefficients(
            gamma_n=self.gamma_n, last_w=(self.c_last * eta_cols).transpose(-1, -2),
            c_prev_eta=-(self.c_prev * eta_cols), gamma_prev=self.gamma_prev,
            decay_eta=self.decay_prev * eta_cols, decay_last_eta=(self.decay_last * eta_cols).transpose(-1, -2),
            b_prev=self.b_prev, b_n=self.b_n, e_n=None if m is None else m.e_n,
            step_w=None if m is None else (m.last * eta).unsqueeze(-1), dgd=dgd)


@dataclass(frozen=True)
class _DgdCoefficients:
    """The factors of ``_dgd_layer`` for one layer (``_ChunkDecays.coefficients``), each
    broadcast against the layer's ``(..., n, ·)`` tensors."""

    gamma_n: Tensor  # γ_n, (..., 1, 1)
    last_w: Tensor  # c_{n,j} η_j, (..., n, 1)
    c_prev_eta: Tensor  # -c_{t-1,j} η_j, (..., n, n)
    gamma_prev: Tensor  # γ_{t-1}, (..., n, 1)
    decay_eta: Tensor  # (γ_{t-1}/γ_s) η_s (s < t), (..., n, n)
    decay_last_eta: Tensor  # (γ_n/γ_s) η_s, (..., n, 1)
    b_prev: Tensor | None  # b_{t-1}, (..., n, 1)
    b_n: Tensor | None  # b_n, (..., 1, 1)
    e_n: Tensor | None  # E_n, (..., 1, 1)
    step_w: Tensor | None  # (E_n / E_j) η_j, (..., n, 1)
    dgd: bool


def _dgd_layer(w0: Tensor, s0: Tensor | None, delta: Tensor, z: Tensor, read: Tensor | None,
               co: _DgdCoefficients, kernel: bool) -> tuple[Tensor, Tensor | None]:
    """(W_n, S_n) of one layer after a chunk. z may be shared by the memories stacked on a
    leading dim (size 1 there): the Gram matrix and, with it, the DGD system are then shared."""
    if co.dgd:
        args = (w0, s0, delta, z, linear(w0, z, _option(kernel)) if read is None else read, co.gamma_n, co.last_w, co.c_prev_eta,
                co.gamma_prev, co.decay_eta, co.decay_last_eta, co.b_prev, co.b_n, co.e_n, co.step_w)
        # One dtype inside (autocast mixes bf16 products with fp32 weights); autograd casts back.
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in args if t is not None))
        with torch.autocast(w0.device.type, enabled=False):
            out: tuple[Tensor, Tensor | None] = _DgdLayer.apply(  # type: ignore[no-untyped-call]
                kernel, *(None if t is None else t.to(dtype) for t in args))
        return out
    update = _matmul((delta * co.last_w).transpose(-1, -2), z, kernel)
    if s0 is None or co.b_n is None or co.e_n is None or co.step_w is None:
        return co.gamma_n * w0 - update, None
    return (co.gamma_n * w0 + co.b_n * s0 - update,
            co.e_n * s0 - _matmul((delta * co.step_w).transpose(-1, -2), z, kernel))


def _option(kernel: bool) -> str | None:
    """The config switch that turns nestlearn's CPU kernels on, for ``cpu_kernels.matmul``."""
    return COMPILE_OPTION if kernel else None


def _matmul(a: Tensor, b: Tensor, kernel: bool) -> Tensor:
    """``a @ b``; with ``kernel``, CPU float products run on ``cpu_kernels.matmul``."""
    return cpu_kernels.matmul(a, b, _option(kernel))


def _row_sum(x: Tensor) -> Tensor:
    return x.sum(-1, keepdim=True)


def _solve(system: Tensor, rhs: Tensor, transpose: bool, kernel: bool) -> Tensor:
    """X with (I + strict_lower(system)) X = rhs (its transpose with ``transpose``): with
    ``kernel``, CPU tensors and no graph recorded, nestlearn's C++ kernel (``cpu_kernels``, ~3×
    faster here); otherwise, and whenever the solve itself must be differentiable (double
    backward), ``torch.linalg.solve_triangular``."""
    if kernel and system.device.type == "cpu" and not torch.is_grad_enabled():
        return cpu_kernels.unit_triangular_solve(system, rhs, transpose, COMPILE_OPTION)
    if transpose:
        system = system.transpose(-1, -2)
    out: Tensor = torch.linalg.solve_triangular(system, rhs, upper=transpose, unitriangular=True)
    return out


class _DgdLayer(torch.autograd.Function):
    """The DGD chunk update of one layer (``_dgd_layer``) with a hand-written backward.

    Forward, with G = Z Zᵀ, Δ = [δ_t], A = -c_{t-1,j} η_j ⊙ G, L = I + strict_lower(de ⊙ G):

        rhs = A Δ + γ_{t-1} ⊙ read + b_{t-1} ⊙ Z S_0ᵀ,   P = L⁻¹ rhs,
        R = c_{n,j} η_j ⊙ Δ + (γ_n/γ_j) η_j ⊙ P,       W_n = γ_n W_0 + b_n S_0 - Rᵀ Z,
        S_n = E_n S_0 - ((E_n/E_j) η_j ⊙ Δ)ᵀ Z.

    Autograd of these ops keeps every broadcast product and accumulates into many temporaries;
    here backward saves only the inputs, G and P (R is recomputed), does one transposed solve
    and reduces broadcast gradients (e.g. the layer-1 system shared by the stacked memories)
    before multiplying. It is written with differentiable ops and, under ``create_graph``,
    rebuilds G and P from the inputs, so double backward works too.
    """

    @staticmethod
    def solve(s0: Tensor | None, delta: Tensor, z: Tensor, read: Tensor, c_prev_eta: Tensor, gamma_prev: Tensor,
              decay_eta: Tensor, b_prev: Tensor | None, kernel: bool) -> tuple[Tensor, Tensor]:
        """G and P (the DGD terms p_t)."""
        gram = _matmul(z, z.transpose(-1, -2), kernel)
        rhs = torch.addcmul(_matmul(c_prev_eta * gram, delta, kernel), gamma_prev, read)
        if s0 is not None and b_prev is not None:
            rhs = rhs + linear(s0, b_prev * z, _option(kernel))
        return gram, _solve(decay_eta * gram, rhs, False, kernel)

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, kernel: bool, w0: Tensor, s0: Tensor | None,
                delta: Tensor, z: Tensor, read: Tensor, gamma_n: Tensor, last_w: Tensor, c_prev_eta: Tensor,
                gamma_prev: Tensor, decay_eta: Tensor, decay_last_eta: Tensor, b_prev: Tensor | None,
                b_n: Tensor | None, e_n: Tensor | None, step_w: Tensor | None) -> tuple[Tensor, Tensor | None]:
        gram, p = _DgdLayer.solve(s0, delta, z, read, c_prev_eta, gamma_prev, decay_eta, b_prev, kernel)
        rows = torch.addcmul(delta * last_w, p, decay_last_eta)
        new_w = gamma_n * w0 - _matmul(rows.transpose(-1, -2), z, kernel)
        new_s = None
        if s0 is not None:
            assert b_n is not None and e_n is not None and step_w is not None
            new_w = new_w + b_n * s0
            new_s = e_n * s0 - _matmul((delta * step_w).transpose(-1, -2), z, kernel)
        saved = (w0, s0, delta, z, read, gram, p, gamma_n, last_w, c_prev_eta, gamma_prev, decay_eta,
                 decay_last_eta, b_prev, b_n, e_n, step_w)
        ctx.save_for_backward(*saved)  # type: ignore[arg-type]  # None entries are allowed
        ctx.kernel = kernel  # type: ignore[attr-defined]
        return new_w, new_s

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g_w: Tensor, g_s: Tensor | None,
                 ) -> tuple[Tensor | None, ...]:
        with torch.autocast(g_w.device.type, enabled=False):
            return (None, *_DgdLayer._backward(ctx.saved_tensors, g_w, g_s, ctx.kernel))  # type: ignore[attr-defined]

    @staticmethod
    def _backward(saved: tuple[Tensor, ...], g_w: Tensor, g_s: Tensor | None, kernel: bool,
                  ) -> tuple[Tensor | None, ...]:
        """The gradients of the inputs; without momentum s0 and its factors are ``None`` in ``saved``."""
        (w0, s0, delta, z, read, gram, p, gamma_n, last_w, c_prev_eta, gamma_prev, decay_eta, decay_last_eta,
         b_prev, b_n, e_n, step_w) = saved
        if torch.is_grad_enabled():  # double backward: G and P as functions of the inputs
            gram, p = _DgdLayer.solve(s0, delta, z, read, c_prev_eta, gamma_prev, decay_eta, b_prev, kernel)
        # Signs are moved onto the small (n, 1) and (1, 1) factors: h = -dL/dR, r = -dL/d(rhs),
        # acc = -dL/dZ (before the Gram term).
        rows = torch.addcmul(delta * last_w, p, decay_last_eta)
        h = _matmul(z, g_w.transpose(-1, -2), kernel)
        acc = _matmul(rows, g_w, kernel)
        g_delta = h * -last_w
        g_s0 = g_bp = g_bn = g_en = g_sw = None
        if s0 is not None:
            assert g_s is not None
            h_s = _matmul(z, g_s.transpose(-1, -2), kernel)
            acc = acc + _matmul(delta * step_w, g_s, kernel)
            g_delta = torch.addcmul(g_delta, h_s, step_w, value=-1)
            g_sw = -_row_sum(h_s * delta)
            g_s0 = torch.addcmul(b_n * g_w, e_n, g_s)
            g_bn = (g_w * s0).sum((-2, -1), keepdim=True)
            g_en = (g_s * s0).sum((-2, -1), keepdim=True)
        system = decay_eta * gram
        r = _solve(system, h * decay_last_eta, True, kernel)
        g_system = _matmul(r, p.transpose(-1, -2), kernel).sum_to_size(system.shape).tril(-1)
        q = _matmul(r, delta.transpose(-1, -2), kernel)  # -dL/dA
        g_delta = g_delta - _matmul((c_prev_eta * gram).transpose(-1, -2), r, kernel)
        g_gram = (g_system * decay_eta).sum_to_size(gram.shape) - (q * c_prev_eta).sum_to_size(gram.shape)
        if s0 is not None:
            u = _matmul(r, s0, kernel)
            acc = torch.addcmul(acc, b_prev, u)
            g_bp = -_row_sum(z * u)
            g_s0 = g_s0 - _matmul((b_prev * r).transpose(-1, -2), z, kernel)
        g_z = _matmul(g_gram + g_gram.transpose(-1, -2), z, kernel) - acc.sum_to_size(z.shape)

        def fit(g: Tensor | None, like: Tensor | None) -> Tensor | None:
            return None if g is None or like is None else g.sum_to_size(like.shape)

        return (fit(gamma_n * g_w, w0), fit(g_s0, s0), fit(g_delta, delta), g_z, fit(r * -gamma_prev, read),
                fit((g_w * w0).sum((-2, -1), keepdim=True), gamma_n), fit(-_row_sum(h * delta), last_w),
                fit(-(q * gram), c_prev_eta), fit(-_row_sum(r * read), gamma_prev),
                fit(g_system * gram, decay_eta), fit(-_row_sum(h * p), decay_last_eta),
                fit(g_bp, b_prev), fit(g_bn, b_n), fit(g_en, e_n), fit(g_sw, step_w))


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
        """Initialise what ``nn.Linear`` does not: memories, readouts, convolution (identity)."""
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
        c, spec = self.config, self.config.spec()
        if state is None:
            state = self.initial_state(x.shape[0])
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
                                         log_beta, c.dgd, c.compile)

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
            o = mlp_forward(group.weights.layers, queries[..., first - p_mem:end - p_mem, :], spec)
            if not complete:
                return o, None
            w = stream.slice(start, end)
            v_hat = mlp_forward(group.weights.layers, w.v, spec)
            grads = l2_loss_grads(group.weights.layers, w.k, v_hat, spec)
            with torch.no_grad():  # a metric: no graph
                surprise.append(grads.sq_norm())
            return o, dgd_chunk_update(group, grads, w.theta, w.log_keep, w.log_eta, c.dgd, c.compile)

        outs, memory = chunk_scan(state.memory, stream.length, p_mem, c.memory_chunk_size, memory_step)
        o = torch.cat(outs, dim=-2) if outs else q
        total_other = p_other + n_new
        new_state = SelfRefState(
            other, x_stream[..., total_other - total_other % c.other_chunk_size:, :], memory,
            stream.slice(stream.length - stream.length % c.memory_chunk_size, stream.length), cache,
            self_ref_stats(eta, writes.log_keep, None if log_momentum is None else log_momentum[1], surprise,
                           memory.momentum))
        return self.readout(o), new_state

    def _forward_aligned(self, xh: Tensor, q: Tensor, state: SelfRefState,
                         log_momentum: tuple[Tensor, Tensor] | None, cache: Tensor | None,
                         ) -> tuple[Tensor, SelfRefState]:
        """``forward`` when both groups share chunk boundaries (equal chunk sizes, equally long
        buffers): the five memories M_k, M_v, M_η, M_α, M_memory run as one stacked batch
        ``(B, H, 5, out, in)``, one pass per chunk. Same equations as the general path: the
        buffered tokens' writes are regenerated from the same chunk-start memories. ``q``: the
        static queries, normalised per chunk (``_aligned_chunk``)."""
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
            factors = _MomentumDecay.build(log_beta.unsqueeze(-1).expand(*log_beta.shape, chunk))
            decay = (factors.first, factors.ratios, factors.e_n, factors.last)
        params = self._write_params()
        compiled = _compiled_chunk(c, xh.device.type) if c.compile else None
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
                o, pack, sq, new_weights, new_momentum = _aligned_chunk(c, complete, weights, momentum, decay, xs,
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


ChunkOut = tuple[Tensor, Tensor, Tensor | None, tuple[Tensor, ...] | None, tuple[Tensor, ...] | None]


def _aligned_chunk(c: SelfRefTitansConfig, complete: bool, weights: tuple[Tensor, ...],
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
    ``decay``: the fields of ``_MomentumDecay``. A function of tensors only
    (no module), so ``_compiled_chunk`` compiles it once per config."""
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
    other_out, memory_out = mlp_forward(weights, inp, spec, _option(c.compile)).split_with_sizes([n_other, 1], dim=-3)
    tw = token_writes(c, other_out, xs, readout_weight, readout_bias, to_k, to_v)
    if not complete:
        pack = torch.cat([tw.k, tw.v, tw.eta.unsqueeze(-1), tw.log_alpha.unsqueeze(-1)], dim=-1)
        return memory_out[..., 0, :, :], pack, None, None, None
    with torch.no_grad():
        rates = torch.stack([tw.eta, tw.log_alpha], dim=-1)
    grads, reads = _target_grads(weights, tw.v, tw.k, spec, c.compile)
    with torch.no_grad():  # a metric of M_memory's inner loop: no graph
        sq = RankOneGrads(tuple(t[..., n_other, :, :] for t in grads.deltas),
                          tuple(t[..., min(n_other, t.shape[-3] - 1), :, :] for t in grads.inputs)).sq_norm()
    new = _dgd_chunk_update(GroupState(MemoryWeights(weights), None if momentum is None else MemoryWeights(momentum)),
                            grads, reads, tw.eta.unsqueeze(-2), tw.log_alpha.unsqueeze(-2),
                            None if decay is None else _MomentumDecay(*decay), c.dgd, c.compile)
    return (memory_out[..., 0, :, :], rates, sq, new.weights.layers,
            None if new.momentum is None else new.momentum.layers)


@functools.cache
def _compiled_chunk(c: SelfRefTitansConfig, device_type: str) -> Callable[..., ChunkOut]:
    """``_aligned_chunk`` of a full chunk under ``torch.compile``, one per config (``compile``)
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
    step = torch.compile(functools.partial(_aligned_chunk, c, True), dynamic=False, options=options)

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
        u_v, u_k = linear(w, a_v, _option(kernel)), linear(w, a_k, _option(kernel))
        pre.append(u_k)
        a_v, a_k = (activate(u_v, spec.activation), activate(u_k, spec.activation)) if i < depth - 1 else (u_v, u_k)
    diff = a_k - a_v
    delta = 2 * (diff + (k - v).unsqueeze(-3) if spec.residual else diff)
    deltas = [delta]
    for i in range(depth - 1, 0, -1):
        delta = _matmul(delta, layers[i], kernel) * activation_derivative(pre[i - 1], spec.activation)
        deltas.append(delta)
    return RankOneGrads(tuple(reversed(deltas)), tuple(inputs)), tuple(pre)
