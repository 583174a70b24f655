"""Multi-query associative recall (MQAR), the in-context recall task of Zoology (Arora et al.
2023, "Zoology: measuring and improving recall in efficient language models").

A sequence starts with ``num_pairs`` key-value pairs (k₁ v₁ k₂ v₂ …); the rest of it is a
query region in which every key appears once more, at an even offset drawn without replacement
from a power law over the gaps (p(g) ∝ a·g^(a−1), g = 1…space: short gaps are likely, as repeated
bigrams in text are), and the model must predict the key's value right after it. Keys come from
the lower half of the vocabulary (never token 0), values from the upper half; the other
positions of the query region are filler: uniformly random tokens (``random_non_queries``, the
source's default) or 0. Loss and accuracy count only the answer positions (``IGNORE``
elsewhere), as in the source.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE = -100  # the target of positions that are not answers (``cross_entropy``'s ignore_index)


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR setting; the defaults are Zoology's (power 0.01, random filler)."""

    seq_len: int = 64
    num_pairs: int = 8
    vocab_size: int = 8192
    power_a: float = 0.01
    random_non_queries: bool = True

    def __post_init__(self) -> None:
        if self.seq_len % 2:
            raise ValueError(f"seq_len must be even, got {self.seq_len}")
        if self.num_pairs < 1 or 4 * self.num_pairs > self.seq_len:
            raise ValueError(f"num_pairs must be in [1, seq_len / 4] (pairs, then as many queries with "
                             f"room between them), got {self.num_pairs} for seq_len {self.seq_len}")
        if self.vocab_size // 2 - 1 < self.num_pairs or self.vocab_size <= self.seq_len:
            raise ValueError(f"vocab_size {self.vocab_size} is too small for {self.num_pairs} distinct "
                             f"keys and values and sequences of {self.seq_len}")
        if not 0 < self.power_a <= 1:
            raise ValueError(f"power_a must be in (0, 1] (1: uniform gaps), got {self.power_a}")

    @property
    def space(self) -> int:
        """The number of even offsets in the query region a query can take."""
        return (self.seq_len - 2 * self.num_pairs) // 2


def gap_probabilities(space: int, power_a: float) -> Tensor:
    """p(g) ∝ a g^(a−1) over g = 1…space (float64)."""
    g = torch.arange(1, space + 1, dtype=torch.float64)
    p = power_a * g ** (power_a - 1)
    return p / p.sum()


def mqar_batch(cfg: MQARConfig, num_examples: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Inputs and targets ``(num_examples, seq_len)``: the target at a queried key's position is
    its value, ``IGNORE`` elsewhere."""
    n, pairs, half = num_examples, cfg.num_pairs, cfg.vocab_size // 2
    keys = torch.rand(n, half - 1, generator=generator).argsort(dim=1)[:, :pairs] + 1  # distinct, in [1, half)
    values = torch.rand(n, cfg.vocab_size - half, generator=generator).argsort(dim=1)[:, :pairs] + half
    context = torch.stack([keys, values], dim=2).reshape(n, 2 * pairs)
    # gaps without replacement, by the power law: Gumbel-top-k on log p
    logp = gap_probabilities(cfg.space, cfg.power_a).log().float()
    gumbel = -torch.log(-torch.log(torch.rand(n, cfg.space, generator=generator).clamp_min(1e-20)))
    gaps = (logp + gumbel).topk(pairs, dim=1).indices  # 0-based slot g - 1
    region_len = cfg.seq_len - 2 * pairs
    if cfg.random_non_queries:
        region = torch.randint(0, cfg.vocab_size, (n, region_len), generator=generator)
    else:
        region = torch.zeros(n, region_len, dtype=torch.long)
    region.scatter_(1, 2 * gaps, keys)
    inputs = torch.cat([context, region], dim=1)
    targets = torch.full_like(inputs, IGNORE)
    targets.scatter_(1, 2 * pairs + 2 * gaps, values)
    return inputs, targets


def answer_accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """The share of answer positions (targets != ``IGNORE``) whose most likely token is right."""
    mask = targets != IGNORE
    return (logits.argmax(-1)[mask] == targets[mask]).float().mean()
