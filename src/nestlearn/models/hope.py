"""Hope language models: a sequence mixer followed by a Continuum Memory System (CMS).

Nested Learning (arXiv 2512.24695 §8.3, Eqs. 94-97) builds Hope as "self-modifying Titans
followed by CMS", and Hope-Attention by replacing the self-modifying Titans with softmax global
attention. Three models are registered here:

* ``hope``: x += SelfRefTitans(norm(x)); x = CMS(x), the paper's Hope: the self-referential
  Titans of `nestlearn.memory.self_ref` (configured by ``model.self_ref``) as the sequence
  mixer, no softmax attention at all, then the CMS.
* ``hope_attention``: x += Attn(norm(x)); x = CMS(x), i.e. a Transformer++ whose MLP is a
  CMS (with ``cms.chunk_sizes: [1]`` and no in-context learning it *is* `TransformerPP`).
* ``hope_attn_titans``: x += Attn(norm(x)); x += NeuralMemory(norm(x)); x = CMS(x), the
  reproduction guide's block, with the Titans long-term memory (`nestlearn.memory`) configured
  by the ``model.titans.memory_*`` fields.

Each CMS level is pre-norm and residual inside `ContinuumMemory`. The state (`HopeState`) holds
the attention caches, the memory states and, with ``cms.in_context``, the CMS weights of every
context; one call over a sequence, calls over its chunks and token-by-token calls agree.

In-context CMS (``cms.in_context: true``; Eq. 71 on the token clock). The sequence is processed
in segments of S = min_l C^(l) tokens, aligned to absolute positions. Within a segment every
level's weights are fixed; when the segment ends, the task loss of the segment, the
next-token cross-entropy of its S - 1 (input, target) pairs that both lie inside it, summed, is
differentiated (`torch.autograd.grad`) with respect to the weights every level of every layer
used, and `ContinuumMemory.step` adds that to each level's accumulated gradient and applies the
updates due (level l: every C^(l) tokens, -η^(l) x the sum). No target outside a segment is ever
used, so logits at position t depend on tokens <= t only. The gradient is taken with
``create_graph=self.training``: in training the updates stay differentiable and the outer loss
meta-learns the initial CMS weights through them (attention then runs on SDPA's math kernel,
the one with a double backward on CPU); in evaluation the updates are a first-order inner loop
cut from the outer graph. A call made under `torch.no_grad` still learns in context (gradients
are enabled inside) and returns detached logits.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nestlearn.config.schema import ModelConfig
from nestlearn.memory import (
    MemoryState,
    NeuralMemory,
    NeuralMemoryConfig,
    SelfRefState,
    SelfRefTitans,
    SelfRefTitansConfig,
)
from nestlearn.models.base import LanguageModel
from nestlearn.models.cms import CMSLevel, CMSState, ContinuumMemory, LevelWeights
from nestlearn.models.layers import (
    CausalSelfAttention,
    LayerKV,
    RMSNorm,
    swiglu_hidden,
)
from nestlearn.models.registry import register
from nestlearn.models.titans import memory_config

BASE_LEVEL = "base"  # the level of every non-CMS parameter: updated at every step


def self_ref_config(cfg: ModelConfig) -> SelfRefTitansConfig:
    """The `SelfRefTitans` mixer of ``hope`` from ``model.self_ref`` (heads = ``n_heads``)."""
    s = cfg.self_ref
    return SelfRefTitansConfig(
        d_model=cfg.d_model, heads=cfg.n_heads, head_dim=cfg.d_model // cfg.n_heads,
        depth=s.depth, expansion=s.expansion, memory_chunk_size=s.memory_chunk_size,
        other_chunk_size=s.other_chunk_size, momentum=s.momentum, dgd=s.dgd, qk_norm=s.qk_norm,
        v_norm=s.v_norm, conv_kernel=s.conv_kernel, eta_max=s.eta_max,
        static_projections=tuple(s.static_projections), weight_decay=s.weight_decay,
        in_chunk_reads=s.in_chunk_reads, mix_input=s.mix_input, step_bound=s.step_bound,
        curvature_step=s.curvature_step, compile=s.compile,
        activation_budget=s.activation_budget)


@dataclass(frozen=True)
class LayerState:
    """One block's sequence state: attention keys/values or the self-referential memories,
    and, with Titans, the memory state."""

    kv: LayerKV | None = None
    memory: MemoryState | None = None
    self_ref: SelfRefState | None = None

    def detach(self) -> LayerState:
        kv = None if self.kv is None else (self.kv[0].detach(), self.kv[1].detach())
        return LayerState(kv, None if self.memory is None else self.memory.detach(),
                          None if self.self_ref is None else self.self_ref.detach())


@dataclass(frozen=True)
class Segment:
    """The in-context segment in progress: the CMS weights it runs with (per layer, per level;
    the inputs of its gradient), its task loss so far and the last logits awaiting a target."""

    weights: tuple[tuple[LevelWeights, ...], ...]
    loss: Tensor | None
    last_logits: Tensor | None


@dataclass(frozen=True)
class HopeState:
    """Everything a `HopeLM` carries between calls; `pos` is the next token's position.

    `cms` (one `CMSState` per layer) and `segment` exist only with in-context CMS.
    """

    layers: tuple[LayerState, ...]
    pos: int
    cms: tuple[CMSState, ...] | None = None
    segment: Segment | None = None


class HopeBlock(nn.Module):
    """x + Mixer(norm(x)) (attention, or self-referential Titans), then x + NeuralMemory(norm(x))
    when there is one, then CMS(x)."""

    def __init__(self, cfg: ModelConfig, memory: NeuralMemoryConfig | None,
                 self_ref: SelfRefTitansConfig | None = None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads) if self_ref is None else None
        self.self_ref = SelfRefTitans(self_ref) if self_ref is not None else None
        self.memory_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if memory is not None else None
        self.memory = NeuralMemory(memory) if memory is not None else None
        hidden = cfg.cms.hidden or cfg.mlp_hidden or swiglu_hidden(cfg.d_model)
        self.cms = ContinuumMemory(cfg.d_model, hidden, cfg.cms, cfg.norm_eps)

    def mixer_out(self) -> nn.Linear:
        """The sequence mixer's output projection (the residual branch's last matrix)."""
        if self.attn is not None:
            return self.attn.proj
        assert self.self_ref is not None
        return self.self_ref.to_out

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, state: LayerState,
                cms_weights: Sequence[LevelWeights] | None) -> tuple[Tensor, LayerState]:
        kv, self_ref_state = None, None
        if self.attn is not None:
            h, kv = self.attn(self.attn_norm(x), cos, sin, state.kv)
        else:
            assert self.self_ref is not None
            h, self_ref_state = self.self_ref(self.attn_norm(x), state.self_ref)
        x = x + h
        memory_state = None
        if self.memory is not None and self.memory_norm is not None:
            h, memory_state = self.memory(self.memory_norm(x), state.memory)
            x = x + h
        return self.cms(x, cms_weights), LayerState(kv, memory_state, self_ref_state)


class HopeLM(LanguageModel):
    """Embeddings, `HopeBlock`s, final RMSNorm and an output head (tied by default)."""

    def __init__(self, cfg: ModelConfig, memory: NeuralMemoryConfig | None = None,
                 self_ref: SelfRefTitansConfig | None = None) -> None:
        super().__init__(cfg)
        self.build_trunk(HopeBlock(cfg, memory, self_ref) for _ in range(cfg.n_layers))
        self.in_context = cfg.cms.in_context
        self.segment_size = min(cfg.cms.chunk_sizes)
        self.reset_parameters()
        self.tie_head()

    def fsdp_units(self) -> list[nn.Module]:
        """None with in-context CMS: forward reads and steps the blocks' CMS levels between the
        blocks' calls, so FSDP2 shards the model as one unit."""
        return [] if self.in_context else super().fsdp_units()

    def hope_blocks(self) -> list[HopeBlock]:
        blocks = []
        for block in self.blocks:
            assert isinstance(block, HopeBlock)
            blocks.append(block)
        return blocks

    def reset_parameters(self) -> None:
        """`TransformerPP`'s initialisation: N(0, init_std) linear and embedding weights (the
        Titans memory keeps its own, `NeuralMemory.__init__`), norm gains 1, and every residual
        branch's output projection at init_std / sqrt(branches x n_layers). The branches of a
        block are attention, the memory and each CMS level (the independent form's weighted
        sum counts once), so k = 1 matches the Transformer's 1 / sqrt(2 n_layers)."""
        std = self.config.init_std
        memory_modules = {id(m) for b in self.hope_blocks() for mem in (b.memory, b.self_ref)
                          if mem is not None for m in mem.modules()}
        for module in self.modules():
            if id(module) in memory_modules:
                continue
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        k = len(self.config.cms.chunk_sizes)
        for block in self.hope_blocks():
            cms_branches = 1 if block.cms.agg is not None else k
            branches = 1 + cms_branches + (block.memory is not None)
            residual_std = std / math.sqrt(branches * self.config.n_layers)
            nn.init.normal_(block.mixer_out().weight, mean=0.0, std=residual_std)
            for level in block.cms.level_modules():
                nn.init.normal_(level.mlp.w_out.weight, mean=0.0, std=residual_std)
            if block.memory is not None:
                nn.init.normal_(block.memory.to_out.weight, mean=0.0, std=residual_std)

    # ---- levels (training-time clocks of Eq. 71) ------------------------------------------

    def _cms_levels(self) -> Iterator[CMSLevel]:
        for block in self.hope_blocks():
            yield from block.cms.level_modules()

    def levels(self) -> dict[str, list[nn.Parameter]]:
        """`HasLevels`: CMS level parameters under ``cms_<C>`` (levels of equal C across layers
        share one), every other trainable parameter under ``base``; frozen parameters and
        levels left without trainable ones are omitted."""
        groups: dict[str, list[nn.Parameter]] = {}
        in_cms: set[int] = set()
        for level in self._cms_levels():
            params = [p for p in level.parameters() if p.requires_grad]
            in_cms.update(id(p) for p in level.parameters())
            if params:
                groups.setdefault(f"cms_{level.chunk_size}", []).extend(params)
        base = [p for p in self.parameters() if p.requires_grad and id(p) not in in_cms]
        return ({BASE_LEVEL: base} if base else {}) | groups

    def level_chunk_sizes(self) -> dict[str, int]:
        """Chunk size (in optimizer steps) of each level of `levels()`: ``base`` 1, ``cms_C`` C."""
        return {name: 1 if name == BASE_LEVEL else int(name.removeprefix("cms_"))
                for name in self.levels()}

    # ---- cost ------------------------------------------------------------------------------

    def flops_per_token(self, seq_len: int) -> float:
        """`LanguageModel`'s 6N + attention estimate, the attention term only for blocks that
        have softmax attention (`hope` has none), plus the in-context work.

        Titans memory and self-referential Titans: per token, each memory MLP's reads, inner
        gradient and update cost about 8 FLOPs per memory weight forward, 24 in training; the
        initial weights are already in N (6 each), so 18 x the memory weights are added (for
        self-referential Titans all five memories; the DGD solve, O(C d) per token, is left
        out). In-context CMS: every segment back-propagates the task loss to the CMS weights (a
        backward of the whole network, ~4N forward-time FLOPs) and training differentiates
        through it, so the 6N term is counted three times. Rough by design, like the base.
        """
        flops = super().flops_per_token(seq_len)
        if self.in_context:
            flops += 12 * self._matmul_params()
        for block in self.hope_blocks():
            if block.attn is None:
                flops -= 12 * self.config.d_model * seq_len
            if block.memory is not None:
                flops += 18 * sum(w.numel() for w in block.memory.memory_init)
            if block.self_ref is not None:
                flops += 18 * sum(w.numel() for w in (*block.self_ref.other_init,
                                                      *block.self_ref.memory_init))
        return flops

    # ---- forward ---------------------------------------------------------------------------

    def initial_state(self, batch: int) -> HopeState:
        """Empty caches; with in-context CMS every context at the learned initial weights."""
        layers = tuple(LayerState() for _ in self.blocks)
        if not self.in_context:
            return HopeState(layers, 0)
        return HopeState(layers, 0, tuple(b.cms.initial_state(batch) for b in self.hope_blocks()))

    def _check_state(self, ids: Tensor, state: HopeState) -> None:
        if len(state.layers) != len(self.blocks):
            raise ValueError(f"HopeState has {len(state.layers)} layers, the model {len(self.blocks)}")
        if (state.cms is not None) != self.in_context:
            raise ValueError("HopeState does not match the model's cms.in_context setting")
        kv, self_ref = state.layers[0].kv, state.layers[0].self_ref
        batch = kv[0].shape[0] if kv is not None else None
        if self_ref is not None:
            batch = self_ref.other_buffer.shape[0]
        if batch is not None and batch != ids.shape[0]:
            raise ValueError(f"HopeState batch size {batch} != ids batch size {ids.shape[0]}")

    def _run(self, ids: Tensor, start: int, layers: Sequence[LayerState],
             weights: Sequence[Sequence[LevelWeights]] | None) -> tuple[Tensor, tuple[LayerState, ...]]:
        """Logits for ids at positions start.., and the layers' new states."""
        x = self.embed(ids)
        cos, sin = self.rope(start, ids.shape[1], x.device, x.dtype)
        new = []
        for i, block in enumerate(self.hope_blocks()):
            x, layer = block(x, cos, sin, layers[i], None if weights is None else weights[i])
            new.append(layer)
        logits: Tensor = self.lm_head(self.norm(x))
        return logits, tuple(new)

    def forward(self, ids: Tensor, state: HopeState | None = None) -> tuple[Tensor, HopeState]:
        """Logits (B, T, V) for ids (B, T) following the tokens summarised by `state`."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, time), got shape {tuple(ids.shape)}")
        if state is None:
            state = self.initial_state(ids.shape[0])
        self._check_state(ids, state)
        if not self.in_context:
            logits, layers = self._run(ids, state.pos, state.layers, None)
            return logits, HopeState(layers, state.pos + ids.shape[1])
        outer_grad = torch.is_grad_enabled()
        keep_graph = self.training and outer_grad
        kernel = sdpa_kernel(SDPBackend.MATH) if keep_graph else contextlib.nullcontext()
        with torch.enable_grad(), kernel:
            logits, state = self._forward_in_context(ids, state, keep_graph, outer_grad)
        return (logits if outer_grad else logits.detach()), state

    def _forward_in_context(self, ids: Tensor, state: HopeState, keep_graph: bool,
                            outer_grad: bool) -> tuple[Tensor, HopeState]:
        """Segment by segment: run, add the in-segment task loss, learn at segment ends."""
        assert state.cms is not None
        blocks = self.hope_blocks()
        cms, segment, layers, pos = state.cms, state.segment, state.layers, state.pos
        pieces = []
        start = 0
        while start < ids.shape[1]:
            if segment is None:
                segment = Segment(tuple(tuple(b.cms.effective_weights(c, keep_graph))
                                        for b, c in zip(blocks, cms, strict=True)), None, None)
            piece = ids[:, start:start + self.segment_size - pos % self.segment_size]
            logits, layers = self._run(piece, pos, layers, segment.weights)
            pieces.append(logits)
            loss = _segment_loss(segment, logits, piece)
            start += piece.shape[1]
            pos += piece.shape[1]
            if pos % self.segment_size:
                segment = Segment(segment.weights, loss, logits[:, -1])
                continue
            assert loss is not None  # a segment holds >= 2 tokens, so >= 1 target
            inputs = [w for layer in segment.weights for level in layer for w in level]
            # retain_graph: the forward graph is shared with the returned logits (the outer
            # loss) and with other continuations of a state passed in mid-segment.
            grads = torch.autograd.grad(loss, inputs, retain_graph=True, create_graph=keep_graph)
            cms = tuple(b.cms.step(c, _regroup(grads, b_idx, segment.weights), pos)
                        for b_idx, (b, c) in enumerate(zip(blocks, cms, strict=True)))
            segment = None
            if not outer_grad:  # nothing will differentiate through past segments
                layers = tuple(layer.detach() for layer in layers)
        return torch.cat(pieces, dim=1), HopeState(layers, pos, cms, segment)


def _segment_loss(segment: Segment, logits: Tensor, piece: Tensor) -> Tensor | None:
    """The segment's summed next-token loss so far, adding the pairs this piece completes."""
    terms = [] if segment.loss is None else [segment.loss]
    if segment.last_logits is not None:
        terms.append(F.cross_entropy(segment.last_logits, piece[:, 0], reduction="sum"))
    if piece.shape[1] > 1:
        terms.append(F.cross_entropy(logits[:, :-1].flatten(0, 1),
                                     piece[:, 1:].flatten(), reduction="sum"))
    return sum(terms[1:], terms[0]) if terms else None


def _regroup(grads: Sequence[Tensor], layer: int,
             weights: tuple[tuple[LevelWeights, ...], ...]) -> list[LevelWeights]:
    """The flat gradient list of `torch.autograd.grad`, back to layer `layer`'s level pairs."""
    offset = 2 * sum(len(levels) for levels in weights[:layer])
    return [(grads[offset + 2 * i], grads[offset + 2 * i + 1]) for i in range(len(weights[layer]))]


@register("hope")
def build_hope(cfg: ModelConfig) -> HopeLM:
    return HopeLM(cfg, self_ref=self_ref_config(cfg))


@register("hope_attention")
def build_hope_attention(cfg: ModelConfig) -> HopeLM:
    return HopeLM(cfg)


@register("hope_attn_titans")
def build_hope_attn_titans(cfg: ModelConfig) -> HopeLM:
    return HopeLM(cfg, memory_config(cfg))
