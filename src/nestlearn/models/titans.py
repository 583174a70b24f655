"""Titans language models (Behrouz, Zhong, Mirrokni 2025, §4): MAC, MAG, MAL and LMM.

Every variant is a stack of pre-norm residual blocks (§4.4 "In all blocks, we use residual
connections") with a SwiGLU MLP, between a token embedding and a final RMSNorm with a tied
output head; each block owns one neural long-term memory (``NeuralMemory``, §3.1-§3.2) and, but
in LMM, one attention with learned persistent memory tokens (§3.3, Eq. 19; ``PrefixAttention``).

- MAC, memory as a context (§4.1, Eq. 21-25): the sequence is cut into segments of C tokens.
  For segment t: (1) retrieve h_t = M*_{t-1}(q_t), q_t = S^(t) W_Q, from the memory as it was
  at the segment's start, without writing; (2) y_t = Attn([P ‖ h_t ‖ S^(t)]); (3) write y_t
  into the memory; (4) o_t = y_t ⊗ M*(y_t), read after the write.
- MAG, memory as a gate (§4.2, Eq. 26-28): o = SW-Attn*(x̃) ⊗ M(x̃).
- MAL, memory as a layer (§4.3, Eq. 29-31): y = M(x̃), o = SW-Attn*(y).
- LMM (§4.3 "Memory Without Attention"): the memory alone as the token mixer.

Interpretations, where the paper leaves a choice open:

- Causality inside a segment (MAC). h_t has one vector per token, h_j = M*_{t-1}(q_j), and
  depends on token j; under the plain causal mask of Fig. 3a every token of the segment would
  see all of h_t. Here query j sees P, h_{<=j} and S_{<=j}. Likewise M*_t(y_t) of Eq. 25 is
  read per token after writing y_{<=j} (NeuralMemory's y_j = M_j(q_j), Eq. 15-16), not after
  the whole segment. Only the segment's own positions are queried: the outputs at P and h are
  never used.
- RoPE. MAC attends over the short sequence S̃ = [P ‖ h_t ‖ S^(t)] laid out as in Eq. 22, at
  positions 0..Np-1, Np + j and Np + C + j for token j of the segment, the same for every
  segment. MAG/MAL attend over x̃ = [P ‖ x] at positions 0..Np-1 and Np + i for token i.
- Persistent tokens are learned per attention layer in its normalised input space, and only
  the attention sees them: M(x̃) of Eq. 28/30 would first write the fixed tokens P into the
  memory, which only moves the (already learned) initial memory M_0, and in MAL the outputs
  M(P) are again learned constants, i.e. learned persistent tokens of the attention.
- The gate ⊗ (Eq. 25, 28): "normalize the outputs y and M(x̃) using learnable vector-valued
  weights, followed by a non-linearity σ": o = W_O (RMSNorm(y) ⊙ sigmoid(RMSNorm(M))), with
  W_O the attention's output projection (§4.4 "normalization and gating with a linear layer
  before the final output projection"); y is the attention's merged heads.
- MAL and LMM follow the usual hybrid layout (§4.3, as H3): a residual memory sublayer, then
  (MAL) a residual sliding-window attention sublayer, then the MLP.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.config.schema import ModelConfig
from nestlearn.memory import (
    MemoryState,
    MemoryWeights,
    NeuralMemory,
    NeuralMemoryConfig,
    current_memory,
    mlp_forward,
)
from nestlearn.models.attention import PrefixAttention, band_mask
from nestlearn.models.base import LanguageModel
from nestlearn.models.layers import (
    LayerKV,
    RMSNorm,
    SwiGLU,
    apply_rotary,
    swiglu_hidden,
)
from nestlearn.models.registry import register


def memory_config(cfg: ModelConfig) -> NeuralMemoryConfig:
    """The ``NeuralMemoryConfig`` of every block (and of ``hope_attn_titans``), from ``cfg.titans``."""
    t = cfg.titans
    return NeuralMemoryConfig(
        d_model=cfg.d_model, heads=t.memory_heads, head_dim=t.memory_head_dim, depth=t.memory_depth,
        expansion=t.memory_expansion, chunk_size=t.memory_chunk_size, momentum=t.memory_momentum,
        forgetting=t.memory_forgetting, conv_kernel=t.memory_conv_kernel, max_lr=t.memory_max_lr,
        grad_clip=t.memory_grad_clip, write_bound=t.memory_write_bound, compile=t.memory_compile)


def _empty_kv(like: Tensor, batch: int, n_heads: int, head_dim: int) -> LayerKV:
    empty = like.new_zeros(batch, n_heads, 0, head_dim)
    return empty, empty


def _cat_kv(cache: LayerKV, k: Tensor, v: Tensor) -> LayerKV:
    return torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)


@dataclass(frozen=True)
class MACLayerState:
    """One MAC block between calls.

    ``memory``: the memory after every write so far (its chunk-start weights and partial chunk).
    ``segment_memory``: M_{t-1}, the memory weights at the start of the current segment, which
    every retrieval of the segment reads (Eq. 21). ``retrieved`` / ``tokens``: rotated keys and
    values of h_{1..j} and S_{1..j} of the current segment so far ``(B, n_heads, j, head_dim)``;
    the persistent tokens' are recomputed from the parameters.
    """

    memory: MemoryState
    segment_memory: MemoryWeights
    retrieved: LayerKV
    tokens: LayerKV


@dataclass(frozen=True)
class StreamLayerState:
    """One MAG / MAL / LMM block between calls: the memory, and the rotated keys and values of
    the last ``window - 1`` tokens ``(B, n_heads, <= window - 1, head_dim)`` (None in LMM)."""

    memory: MemoryState
    window: LayerKV | None


LayerStateT = TypeVar("LayerStateT", MACLayerState, StreamLayerState)


@dataclass(frozen=True)
class TitansState(Generic[LayerStateT]):
    """A Titans model's state: one state per block, and ``pos``, the number of tokens seen."""

    layers: tuple[LayerStateT, ...]
    pos: int


class GatedOutput(nn.Module):
    """The ⊗ of Eq. 25 and Eq. 28 before the output projection: RMSNorm(y) ⊙ σ(RMSNorm(m))."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.norm_y = RMSNorm(d_model, eps)
        self.norm_m = RMSNorm(d_model, eps)

    def forward(self, y: Tensor, m: Tensor) -> Tensor:
        gated: Tensor = self.norm_y(y) * torch.sigmoid(self.norm_m(m))
        return gated


class TitansBlock(nn.Module):
    """Parts every block has: its memory and its MLP sublayer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.memory = NeuralMemory(memory_config(cfg))
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden or swiglu_hidden(cfg.d_model))

    def residual_outputs(self) -> list[nn.Linear]:
        """The projections that write into the residual stream (scaled down at init)."""
        return [self.mlp.w_out]

    def attention_keys(self, seq_len: int) -> int:
        """Keys per query of this block's attention at context ``seq_len`` (0: no attention)."""
        return 0


class MACBlock(TitansBlock):
    """Memory as a context (§4.1): retrieve, attend, write, gate; then the MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        t = cfg.titans
        self.segment_size = t.segment_size
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.memory_query = nn.Linear(cfg.d_model, t.memory_heads * t.memory_head_dim, bias=False)
        self.attn = PrefixAttention(cfg.d_model, cfg.n_heads, t.n_persistent)
        self.gate = GatedOutput(cfg.d_model, cfg.norm_eps)

    def residual_outputs(self) -> list[nn.Linear]:
        return [self.attn.proj, self.mlp.w_out]

    def attention_keys(self, seq_len: int) -> int:
        return self.attn.n_persistent + 2 * min(self.segment_size, seq_len)

    def start_segment(self, memory: MemoryState) -> MACLayerState:
        """The state at a segment boundary: M_{t-1} = the memory after every write so far."""
        c = self.memory.config
        weights, _ = current_memory(memory.weights, memory.momentum, memory.buffer, c.spec(),
                                    c.grad_clip, c.write_bound)
        batch = weights.layers[0].shape[0]
        empty = _empty_kv(self.attn.proj.weight, batch, self.attn.n_heads, self.attn.head_dim)
        return MACLayerState(memory, weights, empty, empty)

    def initial_state(self, batch: int) -> MACLayerState:
        return self.start_segment(self.memory.initial_state(batch))

    def retrieve(self, weights: MemoryWeights, x: Tensor) -> Tensor:
        """h = M*_{t-1}(q), q = x W_Q (Eq. 21): a read of ``weights`` without any write.

        The query gets the activation and L2 norm of the memory's own queries (§4.4), and the
        result the memory's output norm, gate and projection back to ``d_model``.
        """
        c = self.memory.config
        batch, length, _ = x.shape
        q = F.silu(self.memory_query(x)).view(batch, length, c.heads, c.head_dim).transpose(1, 2)
        if c.qk_norm:
            q = F.normalize(q, dim=-1)
        return self.memory.readout(mlp_forward(weights.layers, q, c.spec()), x)

    def forward(self, x: Tensor, state: MACLayerState, offset: int, cos: Tensor, sin: Tensor,
                ) -> tuple[Tensor, MACLayerState]:
        """x ``(B, n, D)``: tokens ``offset .. offset + n - 1`` of one segment; ``cos``/``sin``
        cover positions 0 .. Np + 2C - 1 of S̃ (module docstring)."""
        if offset == 0:
            state = self.start_segment(state.memory)
        n, n_prefix = x.shape[1], self.attn.n_persistent
        h = self.attn_norm(x)
        retrieved = self.retrieve(state.segment_memory, h)  # (1) read M_{t-1}
        q, k, v = self.attn.heads(h)
        _, k_mem, v_mem = self.attn.heads(retrieved)
        at_tokens = slice(n_prefix + self.segment_size + offset, n_prefix + self.segment_size + offset + n)
        at_memory = slice(n_prefix + offset, n_prefix + offset + n)
        q, k = (apply_rotary(t, cos[at_tokens], sin[at_tokens]) for t in (q, k))
        k_mem = apply_rotary(k_mem, cos[at_memory], sin[at_memory])
        memory_kv = _cat_kv(state.retrieved, k_mem, v_mem)
        token_kv = _cat_kv(state.tokens, k, v)
        index = torch.arange(offset + n, device=x.device)
        visible = band_mask(index[offset:], index, None)
        y = self.attn.attend(q, torch.cat([memory_kv[0], token_kv[0]], dim=2),  # (2) attend
                             torch.cat([memory_kv[1], token_kv[1]], dim=2),
                             torch.cat([visible, visible], dim=1),
                             self.attn.prefix(x.shape[0], cos[:n_prefix], sin[:n_prefix]))
        m, memory = self.memory(y, state.memory)  # (3) write y, (4) read M*(y) after the write
        x = x + self.attn.proj(self.gate(y, m))
        x = x + self.mlp(self.mlp_norm(x))
        return x, MACLayerState(memory, state.segment_memory, memory_kv, token_kv)


class StreamBlock(TitansBlock):
    """A block that takes the sequence whole (no segments): MAG, MAL or LMM."""

    def __init__(self, cfg: ModelConfig, attention: bool) -> None:
        super().__init__(cfg)
        self.window = cfg.titans.window
        self.attn = PrefixAttention(cfg.d_model, cfg.n_heads, cfg.titans.n_persistent) if attention else None

    def attention_keys(self, seq_len: int) -> int:
        return 0 if self.attn is None else self.attn.n_persistent + min(self.window, seq_len)

    def initial_state(self, batch: int) -> StreamLayerState:
        window = (None if self.attn is None else
                  _empty_kv(self.attn.proj.weight, batch, self.attn.n_heads, self.attn.head_dim))
        return StreamLayerState(self.memory.initial_state(batch), window)

    def sliding_attention(self, x: Tensor, cache: LayerKV | None, cos: Tensor, sin: Tensor,
                          ) -> tuple[Tensor, LayerKV]:
        assert self.attn is not None and cache is not None
        return self.attn.sliding(x, cache, cos, sin, self.window)


class MAGBlock(StreamBlock):
    """Memory as a gate (§4.2): o = W_O (SW-Attn*(x̃) ⊗ M(x̃)) on the normalised input."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, attention=True)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.gate = GatedOutput(cfg.d_model, cfg.norm_eps)

    def residual_outputs(self) -> list[nn.Linear]:
        assert self.attn is not None
        return [self.attn.proj, self.mlp.w_out]

    def forward(self, x: Tensor, state: StreamLayerState, cos: Tensor, sin: Tensor,
                ) -> tuple[Tensor, StreamLayerState]:
        assert self.attn is not None
        h = self.attn_norm(x)
        y, window = self.sliding_attention(h, state.window, cos, sin)
        m, memory = self.memory(h, state.memory)
        x = x + self.attn.proj(self.gate(y, m))
        x = x + self.mlp(self.mlp_norm(x))
        return x, StreamLayerState(memory, window)


class MALBlock(StreamBlock):
    """Memory as a layer (§4.3): x + M(norm x), then x + SW-Attn*(norm x), then the MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, attention=True)
        self.memory_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def residual_outputs(self) -> list[nn.Linear]:
        assert self.attn is not None
        return [self.memory.to_out, self.attn.proj, self.mlp.w_out]

    def forward(self, x: Tensor, state: StreamLayerState, cos: Tensor, sin: Tensor,
                ) -> tuple[Tensor, StreamLayerState]:
        assert self.attn is not None
        m, memory = self.memory(self.memory_norm(x), state.memory)
        x = x + m
        y, window = self.sliding_attention(self.attn_norm(x), state.window, cos, sin)
        x = x + self.attn.proj(y)
        x = x + self.mlp(self.mlp_norm(x))
        return x, StreamLayerState(memory, window)


class LMMBlock(StreamBlock):
    """The memory alone (§4.3 "Memory Without Attention"): x + M(norm x), then the MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, attention=False)
        self.memory_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def residual_outputs(self) -> list[nn.Linear]:
        return [self.memory.to_out, self.mlp.w_out]

    def forward(self, x: Tensor, state: StreamLayerState, cos: Tensor, sin: Tensor,
                ) -> tuple[Tensor, StreamLayerState]:
        m, memory = self.memory(self.memory_norm(x), state.memory)
        x = x + m
        x = x + self.mlp(self.mlp_norm(x))
        return x, StreamLayerState(memory, state.window)


class TitansLM(LanguageModel, Generic[LayerStateT]):
    """Embedding, ``n_layers`` blocks, final RMSNorm and a (tied) output head."""

    def fsdp_units(self) -> list[nn.Module]:
        """None: forward reads the memories' initial weights M_0 (`initial_state`) before the
        blocks run, so FSDP2 shards the model as one unit."""
        return []

    def __init__(self, cfg: ModelConfig, make_block: Callable[[ModelConfig], TitansBlock]) -> None:
        super().__init__(cfg)
        self.build_trunk(make_block(cfg) for _ in range(cfg.n_layers))
        self.reset_parameters()
        self.tie_head()

    def reset_parameters(self) -> None:
        """As Transformer++: every linear and embedding weight N(0, init_std), the projections
        into the residual stream N(0, init_std² / (number of residual branches)); the memory's
        own initial weights, convolution and gate biases come from ``NeuralMemory``, the
        persistent tokens are N(0, 1) like a normalised input."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        outputs = [out for block in self.stack for out in block.residual_outputs()]
        for out in outputs:
            nn.init.normal_(out.weight, mean=0.0, std=std / math.sqrt(len(outputs)))

    @property
    def stack(self) -> list[TitansBlock]:
        """The blocks, typed."""
        return cast("list[TitansBlock]", list(self.blocks))

    @abstractmethod
    def initial_state(self, batch: int) -> TitansState[LayerStateT]:
        """The state before the first token: every memory at M_0, empty attention caches."""

    def _start(self, ids: Tensor, state: TitansState[LayerStateT] | None) -> TitansState[LayerStateT]:
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, time), got shape {tuple(ids.shape)}")
        if state is None:
            return self.initial_state(ids.shape[0])
        if len(state.layers) != len(self.blocks):
            raise ValueError(f"state has {len(state.layers)} layers, the model {len(self.blocks)}")
        batch = state.layers[0].memory.weights.layers[0].shape[0]
        if batch != ids.shape[0]:
            raise ValueError(f"state batch size {batch} != ids batch size {ids.shape[0]}")
        return state

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at context ``seq_len``:

            6 N + Σ_attention 12 D K + Σ_memory 3 (12 P + 2 C Σ_l H (in_l + out_l))  [+ 6 P in MAC]

        N: the weights of every per-token matmul (as ``LanguageModel``: non-embedding
        parameters plus the tied head) less the memories' initial weights M_0, which are a
        state, not a layer. Attention (PaLM's rule, the full score rectangle): K keys per query,
        Np + 2 min(C, seq_len) over S̃ in MAC, Np + min(window, seq_len) in MAG/MAL. The memory
        (§3.2 chunk-wise form, forward per token): 2P for the gradient's forward through the
        memory MLP, 2P for back-propagating it, 2P + 2P for the retrieval's M_0 q and S_0 q,
        2P + 2P for the chunk-end updates of M and S (amortised), and the intra-chunk C x C
        products q·z and (c θ)·δ per layer and head; P = H Σ_l out_l in_l is the memory's
        weight count; x3 for training. MAC also reads M_{t-1} once per token (2P, x3).
        """
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        d_model = self.config.d_model
        total = 0.0
        dense = self._matmul_params()
        for block in self.stack:
            c = block.memory.config
            shapes = c.spec().shapes()
            p = c.heads * sum(out * inp for out, inp in shapes)
            dense -= p
            chunk = min(c.chunk_size, seq_len)
            total += 3 * (12 * p + 2 * chunk * c.heads * sum(out + inp for out, inp in shapes))
            total += 12 * d_model * block.attention_keys(seq_len)
            if isinstance(block, MACBlock):
                total += 6 * p
        return float(6 * dense + total)


class TitansMAC(TitansLM[MACLayerState]):
    """Titans MAC (§4.1): segments of ``titans.segment_size`` tokens through every block in turn.

    State (``TitansState[MACLayerState]``): per block the memory, M_{t-1} and the current
    segment's keys and values; ``pos mod C`` is the position inside the segment.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, MACBlock)

    def initial_state(self, batch: int) -> TitansState[MACLayerState]:
        blocks = cast("list[MACBlock]", self.stack)
        return TitansState(tuple(block.initial_state(batch) for block in blocks), 0)

    def forward(self, ids: Tensor, state: TitansState[MACLayerState] | None = None,
                ) -> tuple[Tensor, TitansState[MACLayerState]]:
        state = self._start(ids, state)
        segment = self.config.titans.segment_size
        x = self.embed(ids)
        cos, sin = self.rope(0, self.config.titans.n_persistent + 2 * segment, x.device, x.dtype)
        layers, pos, start, outs = list(state.layers), state.pos, 0, []
        while start < ids.shape[1]:
            offset = pos % segment
            n = min(ids.shape[1] - start, segment - offset)
            h = x[:, start:start + n]
            for i, block in enumerate(self.blocks):
                h, layers[i] = block(h, layers[i], offset, cos, sin)
            outs.append(h)
            start, pos = start + n, pos + n
        logits: Tensor = self.lm_head(self.norm(torch.cat(outs, dim=1) if outs else x))
        return logits, TitansState(tuple(layers), pos)


class TitansStream(TitansLM[StreamLayerState]):
    """Titans MAG, MAL or LMM (§4.2-§4.3): each block takes the whole input at once.

    State (``TitansState[StreamLayerState]``): per block the memory and the sliding window's
    last ``window - 1`` keys and values.
    """

    def __init__(self, cfg: ModelConfig, make_block: Callable[[ModelConfig], StreamBlock]) -> None:
        super().__init__(cfg, make_block)

    def initial_state(self, batch: int) -> TitansState[StreamLayerState]:
        blocks = cast("list[StreamBlock]", self.stack)
        return TitansState(tuple(block.initial_state(batch) for block in blocks), 0)

    def forward(self, ids: Tensor, state: TitansState[StreamLayerState] | None = None,
                ) -> tuple[Tensor, TitansState[StreamLayerState]]:
        state = self._start(ids, state)
        x = self.embed(ids)
        end = self.config.titans.n_persistent + state.pos + ids.shape[1]
        cos, sin = self.rope(0, end, x.device, x.dtype)
        layers = []
        for block, layer in zip(self.blocks, state.layers, strict=True):
            x, layer = block(x, layer, cos, sin)
            layers.append(layer)
        logits: Tensor = self.lm_head(self.norm(x))
        return logits, TitansState(tuple(layers), state.pos + ids.shape[1])


@register("titans_mac")
def build_mac(cfg: ModelConfig) -> TitansMAC:
    return TitansMAC(cfg)


@register("titans_mag")
def build_mag(cfg: ModelConfig) -> TitansStream:
    return TitansStream(cfg, MAGBlock)


@register("titans_mal")
def build_mal(cfg: ModelConfig) -> TitansStream:
    return TitansStream(cfg, MALBlock)


@register("titans_lmm")
def build_lmm(cfg: ModelConfig) -> TitansStream:
    return TitansStream(cfg, LMMBlock)
