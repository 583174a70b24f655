"""Text generation with the models' own state: the prompt is read once, then every new token
costs one step of the recurrence (memories, CMS, attention caches), not a pass over the prefix.

`sample_ids` is the token-level loop (a generator, so callers can stream or stop early);
`generate` wraps it with a tokenizer, stop strings and streaming text. Sampling follows the
usual order: temperature, then top-k, then top-p (nucleus) on what is left; temperature 0 is
greedy decoding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from nestlearn.models.base import LanguageModel


class TextCodec(Protocol):
    """What generation needs of a tokenizer (`nestlearn.data.tokenizer.Tokenizer` is one)."""

    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class SamplingConfig:
    """How each next token is chosen. ``temperature`` 0 is greedy (top-k/top-p then unused);
    ``top_k`` 0 and ``top_p`` 1.0 switch those filters off; ``seed`` fixes the draws (None:
    torch's global generator); ``stop``: strings that end generation (not included in the
    text); ``stop_at_eos``: end at the tokenizer's end-of-sequence token."""

    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits (..., V) with every token outside the top-k, and outside the smallest set whose
    probability reaches top_p, set to -inf. The most likely token always survives."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        drop_sorted = before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """One token per row of logits (B, V)."""
    if sampling.temperature == 0.0:
        return logits.argmax(dim=-1)
    scaled = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def read_prompt(model: LanguageModel, ids: Tensor, piece: int, state: Any | None = None) -> Any:
    """The model's state after ids ``(B, T)``, read ``piece`` tokens per call: activations stay
    bounded by the piece, and a recurrent model's memory stays flat in the prompt's length."""
    for lo in range(0, ids.shape[1], piece):
        _, state = model(ids[:, lo:lo + piece], state)
    return state


@torch.no_grad()
def sample_ids(model: LanguageModel, prompt: Tensor, sampling: SamplingConfig,
               state: Any | None = None) -> Iterator[Tensor]:
    """Yield the next token of every row (B,) after prompt ids (B, T), up to
    ``max_new_tokens``; the prompt is read in one call, each new token in one call of length 1.
    ``state``: a state the prompt continues (None: from the start)."""
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt ids must have shape (batch, length >= 1), got {tuple(prompt.shape)}")
    generator = _generator(sampling.seed, prompt.device)
    logits, state = model(prompt, state)
    for i in range(sampling.max_new_tokens):
        token = next_token(logits[:, -1], sampling, generator)
        yield token
        if i + 1 < sampling.max_new_tokens:
            logits, state = model(token[:, None], state)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be shown without risking a stop string that is still being
    written, or a character that is still being assembled from byte pieces (U+FFFD)."""
    held = max((len(s) - 1 for s in stops), default=0)
    end = max(0, len(text) - held)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return end


def generate(model: LanguageModel, tokenizer: TextCodec, prompt: str,
             sampling: SamplingConfig | None = None, *, on_text: Callable[[str], None] | None = None,
             **overrides: Any) -> str:
    """The text a model writes after ``prompt`` (without the prompt). ``overrides`` replace
    fields of ``sampling`` (e.g. ``temperature=0``); ``on_text`` receives the text as it
    grows, piece by piece (the pieces join to the returned text)."""
    sampling = dataclasses.replace(sampling or SamplingConfig(), **overrides)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty after tokenisation; give at least one character")
    return continue_ids(model, tokenizer, ids, sampling, on_text)


def continue_ids(model: LanguageModel, tokenizer: TextCodec, ids: Sequence[int], sampling: SamplingConfig,
                 on_text: Callable[[str], None] | None = None) -> str:
    """``generate`` after a prompt that is already token ids (at least one)."""
    device = next(model.parameters()).device
    new: list[int] = []
    text, shown = "", 0
    was_training = model.training
    model.eval()
    try:
        for token in sample_ids(model, torch.tensor([ids], device=device), sampling):
            t = int(token[0])
            if sampling.stop_at_eos and t == tokenizer.eos_id:
                break
            new.append(t)
            text = tokenizer.decode(new)
            if (cut := _first_stop(text, sampling.stop)) is not None:
                text = text[:cut]
                break
            if on_text is not None and (end := _safe_length(text, sampling.stop)) > shown:
                on_text(text[shown:end])
                shown = end
    finally:
        model.train(was_training)
    if on_text is not None and len(text) > shown:
        on_text(text[shown:])
    return text
