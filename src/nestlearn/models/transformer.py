"""Transformer++: the Llama-style baseline (pre-norm RMSNorm, RoPE, SwiGLU, no biases).

It is the reference point the memory architectures are compared against, so it stays plain:
one block type, one explicit `KVCache` state, the standard initialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from nestlearn.config.schema import ModelConfig
from nestlearn.models.base import LanguageModel
from nestlearn.models.layers import (
    CausalSelfAttention,
    LayerKV,
    RMSNorm,
    SwiGLU,
    swiglu_hidden,
)
from nestlearn.models.registry import register


@dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for the tokens seen so far, and how many there were.

    `keys[i]` / `values[i]` are layer i's (B, n_heads, pos, head_dim) tensors, keys already
    rotated by RoPE; `pos` is the absolute position of the next token. Frozen, and replaced
    rather than extended in place, so an old cache stays valid after later calls.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    pos: int

    def layer(self, i: int) -> LayerKV:
        return self.keys[i], self.values[i]


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden or swiglu_hidden(cfg.d_model))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerKV | None) -> tuple[torch.Tensor, LayerKV]:
        h, kv = self.attn(self.attn_norm(x), cos, sin, cache)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), kv


class TransformerPP(LanguageModel):
    """Decoder-only Transformer++ whose state is a `KVCache`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.build_trunk(Block(cfg) for _ in range(cfg.n_layers))
        self.reset_parameters()
        self.tie_head()

    def reset_parameters(self) -> None:
        """N(0, init_std) weights; residual-branch outputs scaled by 1/sqrt(2 n_layers) (GPT-2),
        so the residual stream's variance does not grow with depth. Norm gains start at 1."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            assert isinstance(block, Block)
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.w_out.weight, mean=0.0, std=residual_std)

    def _check_state(self, ids: torch.Tensor, state: KVCache) -> None:
        if len(state.keys) != len(self.blocks) or len(state.values) != len(self.blocks):
            raise ValueError(f"KVCache has {len(state.keys)} layers, the model {len(self.blocks)}")
        if state.keys[0].shape[0] != ids.shape[0]:
            raise ValueError(
                f"KVCache batch size {state.keys[0].shape[0]} != ids batch size {ids.shape[0]}"
            )

    def forward(self, ids: torch.Tensor,
                state: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Logits (B, T, V) for ids (B, T) following the tokens cached in `state`."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, time), got shape {tuple(ids.shape)}")
        if state is not None:
            self._check_state(ids, state)
        start = 0 if state is None else state.pos
        x = self.embed(ids)
        cos, sin = self.rope(start, ids.shape[1], x.device, x.dtype)
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            x, (k, v) = block(x, cos, sin, None if state is None else state.layer(i))
            keys.append(k)
            values.append(v)
        logits: torch.Tensor = self.lm_head(self.norm(x))
        return logits, KVCache(tuple(keys), tuple(values), start + ids.shape[1])


@register("transformer++")
@register("transformer")
def build_transformer(cfg: ModelConfig) -> TransformerPP:
    return TransformerPP(cfg)
