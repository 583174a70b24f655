"""``NeuralMemory``: the Titans long-term memory as a sequence layer (Titans §3.1, §3.2, §4.4).

x_t -> q_t, k_t, v_t = SiLU(conv(x_t W_{Q,K,V})) (Eq. 11, §4.4 "Convolution"), q and k
L2-normalised (§4.4); data-dependent θ_t = max_lr σ(x_t w_θ + b_θ), η_t = σ(x_t w_η + b_η),
α_t = σ(x_t w_α + b_α) per head (§3.1); the memory update of Eq. 13 with gradients taken at
the chunk start (Eq. 16); retrieval y_t = M_t(q_t) (Eq. 15); per-head RMS normalisation and a
linear gate before the output projection (§4.4 "Gating").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.memory.chunked import COMPILE_OPTION, chunked_memory_scan, current_memory
from nestlearn.memory.conv import causal_depthwise_conv
from nestlearn.memory.mlp import Activation, MemoryMLPSpec, mlp_forward
from nestlearn.memory.reference import reference_memory_scan
from nestlearn.memory.state import MemoryState, MemoryStats, MemoryWeights, Writes
from nestlearn.memory.token_step import memory_token_step, token_step_applies
from nestlearn.memory.toolchain import compile_available
from nestlearn.utils.numerics import finite_or_zero

COMPILE_COST = "the memory trains ~1.2x slower"

# Initial gate biases: θ = max_lr/2, η = σ(0) = 0.5, α = σ(-6) ≈ 0.0025 per token.
ETA_BIAS_INIT = 0.0
ALPHA_BIAS_INIT = -6.0


@dataclass(frozen=True)
class NeuralMemoryConfig:
    """Options of ``NeuralMemory``; each switches one term of the equations.

    ``depth``/``expansion``/``activation``/``residual``: the memory MLP (``residual`` is the
    Nested Learning M(k) = k + MLP(k); Titans has none). ``momentum=False``: η ≡ 0 (Eq. 10
    without past surprise); ``forgetting=False``: α ≡ 0. ``conv_kernel``: short causal
    depthwise convolution after the q/k/v projections, 0 disables. ``grad_clip``: max norm of
    each token's gradient (all layers together), ``None`` disables. ``write_bound``: scale the
    write of the state a chunk hands on so that it never steps past the minimiser of the
    chunk's loss along it (reads inside the chunk keep the paper's write; ``memory.write_bound``; without it the memory overflows in context on real text, where a
    chunk's keys are aligned); ``False`` is the paper's unbounded write. ``init_scale``: the
    initial memory weights are N(0, init_scale² / fan_in). ``output_gate``: RMS norm and
    SiLU-gate of §4.4 before the output projection. ``compile``: run each complete chunk's
    forward and backward through ``torch.compile`` (``chunked._compiled_steps``), and the
    causal convolution (``conv._compiled``): 1.2-1.26x forward + backward at 1 thread on a
    2-core CPU (``benchmarks/memory_throughput.py``); the first call compiles (~30 s, then
    inductor's disk cache). Eager paths stay for tails, decoding and ``create_graph``
    backwards, so every equivalence and double backward holds as without it.
    """

    d_model: int
    heads: int = 4
    head_dim: int = 64
    depth: int = 2
    expansion: float = 4.0
    activation: Activation = "silu"
    residual: bool = False
    chunk_size: int = 64
    momentum: bool = True
    forgetting: bool = True
    qk_norm: bool = True
    conv_kernel: int = 4
    max_lr: float = 0.1
    grad_clip: float | None = None
    write_bound: bool = True
    init_scale: float = 1.0
    output_gate: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "heads", "head_dim", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.conv_kernel < 0:
            raise ValueError(f"conv_kernel must be >= 0, got {self.conv_kernel}")
        if self.max_lr <= 0:
            raise ValueError(f"max_lr must be > 0, got {self.max_lr}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.init_scale < 0 or (self.init_scale == 0 and self.depth >= 2):
            raise ValueError("init_scale must be > 0 for depth >= 2 (a zero MLP has zero gradients) "
                             f"and >= 0 otherwise, got {self.init_scale}")
        self.spec()  # validates depth, expansion, activation

    def spec(self) -> MemoryMLPSpec:
        return MemoryMLPSpec(self.head_dim, self.depth, self.expansion, self.activation, self.residual)

    @property
    def inner_dim(self) -> int:
        return self.heads * self.head_dim


class NeuralMemory(nn.Module):
    """Titans neural long-term memory: ``forward(x (B, T, D), state) -> (y (B, T, D), state)``.

    Streaming is exact: one call, many calls with the returned state, or one token at a time
    give the same outputs (the state keeps the chunk-start memory and the partial chunk).
    Without autograd a one-token call that completes no chunk advances the carried (M_t, S_t)
    by one step (``token_step``) instead of re-reading the chunk: decoding's cost per token.
    """

    def __init__(self, config: NeuralMemoryConfig) -> None:
        super().__init__()
        self.config = config
        c, inner = config, config.inner_dim
        self.to_qkv = nn.Linear(c.d_model, 3 * inner, bias=False)
        self.conv_weight = (nn.Parameter(torch.empty(3 * inner, 1, c.conv_kernel))
                            if c.conv_kernel else None)
        self.to_theta = nn.Linear(c.d_model, c.heads)
        self.to_eta = nn.Linear(c.d_model, c.heads) if c.momentum else None
        self.to_alpha = nn.Linear(c.d_model, c.heads) if c.forgetting else None
        self.memory_init = nn.ParameterList(
            nn.Parameter(torch.empty(c.heads, out, inp)) for out, inp in c.spec().shapes())
        self.to_gate = nn.Linear(c.d_model, inner, bias=False) if c.output_gate else None
        self.norm_weight = nn.Parameter(torch.ones(c.head_dim)) if c.output_gate else None
        self.to_out = nn.Linear(inner, c.d_model, bias=False)
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """Initialise what ``nn.Linear`` does not: memory weights, convolution, gate biases."""
        c = self.config
        with torch.no_grad():
            for w in self.memory_init:
                w.normal_(0.0, c.init_scale / math.sqrt(w.shape[-1]))
            if self.conv_weight is not None:
                bound = 1 / math.sqrt(c.conv_kernel)
                self.conv_weight.uniform_(-bound, bound)
            nn.init.zeros_(self.to_theta.bias)
            if self.to_eta is not None:
                nn.init.constant_(self.to_eta.bias, ETA_BIAS_INIT)
            if self.to_alpha is not None:
                nn.init.constant_(self.to_alpha.bias, ALPHA_BIAS_INIT)

    def initial_state(self, batch_size: int) -> MemoryState:
        """M_0 = the learned initial memory (shared across the batch), S_0 = 0, no buffer."""
        c, ref = self.config, self.memory_init[0]
        weights = MemoryWeights(tuple(w.unsqueeze(0).expand(batch_size, *w.shape) for w in self.memory_init))
        empty = ref.new_zeros(batch_size, c.heads, 0)
        key = ref.new_zeros(batch_size, c.heads, 0, c.head_dim)
        cache = (ref.new_zeros(batch_size, c.conv_kernel - 1, 3 * c.inner_dim)
                 if c.conv_kernel else None)
        return MemoryState(weights, weights.map(torch.zeros_like),
                           Writes(key, key, empty, empty, empty), cache)

    def project(self, x: Tensor, conv_cache: Tensor | None) -> tuple[Tensor, Writes, Tensor | None]:
        """x ``(B, T, D)`` -> queries ``(B, H, T, d)``, the writes, and the new conv cache."""
        c = self.config
        qkv = self.to_qkv(x)
        if self.conv_weight is not None:
            if conv_cache is None:
                raise ValueError("this memory has convolutions but the state has no conv_cache")
            padded = torch.cat([conv_cache, qkv], dim=1)
            conv_cache = padded[:, padded.shape[1] - (c.conv_kernel - 1):]
            qkv = causal_depthwise_conv(padded, self.conv_weight, COMPILE_OPTION if c.compile else None)
        # One copy into the head layout before the SiLU: its backward then meets contiguous
        # gradients (on the permuted view it ran on strided ones, an order of magnitude slower).
        heads = qkv.reshape(*x.shape[:2], 3, c.heads, c.head_dim).permute(2, 0, 3, 1, 4).contiguous()
        q, k, v = F.silu(heads)
        if c.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        theta = c.max_lr * torch.sigmoid(self.to_theta(x)).transpose(1, 2)
        log_eta = (F.logsigmoid(self.to_eta(x)).transpose(1, 2) if self.to_eta is not None
                   else torch.full_like(theta, float("-inf")))
        log_keep = (F.logsigmoid(-self.to_alpha(x)).transpose(1, 2) if self.to_alpha is not None
                    else torch.zeros_like(theta))
        return q, Writes(k, v, theta, log_eta, log_keep), conv_cache

    def readout(self, y: Tensor, x: Tensor) -> Tensor:
        """Memory output ``(B, H, T, d)`` -> ``(B, T, D)``: RMS norm, gate (§4.4), projection."""
        c = self.config
        if self.to_gate is not None:
            y = F.rms_norm(y, (c.head_dim,), weight=self.norm_weight)
            y = y * F.silu(self.to_gate(x)).reshape(*x.shape[:2], c.heads, c.head_dim).transpose(1, 2)
        out: Tensor = self.to_out(y.transpose(1, 2).reshape(*x.shape[:2], c.inner_dim))
        return out

    def forward(self, x: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        if self.config.compile and not compile_available(x.device.type, COMPILE_OPTION, COMPILE_COST):
            self.config = dataclasses.replace(self.config, compile=False)  # for this process
        c = self.config
        x = finite_or_zero(x)  # a bad input must not poison the state (utils.numerics)
        if state is None:
            state = self.initial_state(x.shape[0])
        if token_step_applies(x, state.buffer.length, c.chunk_size, state.current is not None):
            return self._decode(x, state)
        q, writes, cache = self.project(x, state.conv_cache)
        res = chunked_memory_scan(state.weights, state.momentum, state.buffer, q, writes,
                                  c.spec(), c.chunk_size, c.grad_clip, c.compile, c.write_bound)
        stats = _stats(writes, res.sq_norms, res.momentum)
        current = (None if torch.is_grad_enabled() or res.buffer.length == 0 else
                   current_memory(res.weights, res.momentum, res.buffer, c.spec(), c.grad_clip, bounded=False))
        return self.readout(res.y, x), MemoryState(res.weights, res.momentum, res.buffer, cache, stats, current)

    def _decode(self, x: Tensor, state: MemoryState) -> tuple[Tensor, MemoryState]:
        """``forward`` for one token that completes no chunk, without autograd: (M_t, S_t) from
        the carried copy (or the chunk start) by ``memory_token_step``, y_t = M_t(q_t), the
        buffer grown by the token. The chunk path's equations, token by token."""
        c = self.config
        q, writes, cache = self.project(x, state.conv_cache)
        weights, momentum = state.current or (state.weights, state.momentum)
        weights, momentum, sq = memory_token_step(state.weights, weights, momentum, writes, c.spec(), c.grad_clip)
        y = mlp_forward(weights.layers, q, c.spec())
        stats = _stats(writes, sq, state.momentum)
        return self.readout(y, x), MemoryState(state.weights, state.momentum, state.buffer.cat(writes), cache,
                                               stats, (weights, momentum))

    def forward_reference(self, x: Tensor) -> Tensor:
        """The same layer from the initial state through the per-token reference scan (tests,
        benchmarks): gradients by autograd at each chunk's start, one update per token."""
        c = self.config
        state = self.initial_state(x.shape[0])
        q, writes, _ = self.project(x, state.conv_cache)
        y, _, _ = reference_memory_scan(state.weights, state.momentum, q, writes, c.spec(),
                                        c.chunk_size, c.grad_clip, c.write_bound)
        return self.readout(y, x)


@torch.no_grad()
def _stats(writes: Writes, sq_norms: Tensor, momentum: MemoryWeights) -> MemoryStats:
    return MemoryStats(theta=writes.theta.mean(), eta=writes.log_eta.exp().mean(),
                       alpha=1 - writes.log_keep.exp().mean(),
                       surprise_norm=sq_norms.sqrt().mean(), momentum_norm=momentum.sq_norm().sqrt().mean())
