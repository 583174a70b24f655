"""The interface every language model in the registry implements.

Trainers, evaluators and exporters only see this class, so a new architecture plugs in by
subclassing it and registering a builder; nothing else needs to know its internals.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from nestlearn.config.schema import ModelConfig
from nestlearn.models.layers import RMSNorm, RotaryEmbedding


class LanguageModel(nn.Module, ABC):
    """A causal LM with an explicit state (DESIGN §4).

    `forward(ids, state)` continues exactly where the call that returned `state` stopped: one
    call over a sequence, several calls over its chunks, or one call per token give the same
    logits. Implementations return a new state and never modify the one passed in, so a caller
    can branch (e.g. sample two continuations of one prompt).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    def build_trunk(self, blocks: Iterable[nn.Module]) -> None:
        """The parts every model here shares: token embedding, RoPE table, `blocks`, final
        RMSNorm and output head. Call `tie_head()` after initialising the weights."""
        cfg = self.config
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is not set")
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.d_model // cfg.n_heads, cfg.rope_theta, cfg.max_seq_len)
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def tie_head(self) -> None:
        """Share the embedding matrix with the output head when `tie_embeddings` asks for it."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def fsdp_units(self) -> list[nn.Module]:
        """The submodules FSDP2 may shard one at a time (`train.distributed`): the blocks, which
        forward calls as wholes. A model whose forward reaches into a block's parts from outside
        returns fewer (an unsharded part must be inside the unit being run)."""
        return list(self.blocks)

    @abstractmethod
    def forward(self, ids: torch.Tensor, state: Any | None = None) -> tuple[torch.Tensor, Any]:
        """Logits (B, T, V) for token ids (B, T), and the state after the last token."""

    def _embedding_param_ids(self) -> set[int]:
        return {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, a tied matrix counted once.

        With `exclude_embeddings`, the token-embedding tables (every `nn.Embedding`) are left
        out, as in the scaling-law convention; an untied output head stays in, since it is a
        matmul like any other layer.
        """
        skip = self._embedding_param_ids() if exclude_embeddings else set()
        # parameters() yields a tied matrix once.
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def param_report(self) -> dict[str, int]:
        """Parameters per top-level submodule (a tied matrix under its first owner), plus totals."""
        report: dict[str, int] = {}
        for name, p in self.named_parameters():
            top = name.split(".", 1)[0]
            report[top] = report.get(top, 0) + p.numel()
        report["total"] = self.num_params()
        report["non_embedding"] = self.num_params(exclude_embeddings=True)
        return report

    def _matmul_params(self) -> int:
        """Weights used in a matmul for every token: the non-embedding parameters, plus any
        embedding matrix that is also a linear layer's weight (a tied output head)."""
        embeddings = self._embedding_param_ids()
        reused = {
            id(m.weight): m.weight.numel()
            for m in self.modules()
            if isinstance(m, nn.Linear) and id(m.weight) in embeddings
        }
        return self.num_params(exclude_embeddings=True) + sum(reused.values())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at context length `seq_len`.

        The PaLM appendix-B / nanoGPT MFU estimate:

            6 * N + 12 * n_layers * d_model * seq_len

        N counts the weights of every per-token matmul: the non-embedding parameters plus the
        output head (the tied embedding matrix included; the input lookup is not a matmul;
        norm gains are included, a negligible overcount). A matmul costs 2 FLOPs per weight
        forward and 4 backward, hence 6N. The second term is the attention scores QK^T and
        their use on V, 2 * 2 * d_model * seq_len forward per layer, times 3 for training; as
        in PaLM it counts the full seq_len x seq_len score matrix, not its causal half.
        Architectures with other token mixers override this.
        """
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        attention = 12 * self.config.n_layers * self.config.d_model * seq_len
        return float(6 * self._matmul_params() + attention)
