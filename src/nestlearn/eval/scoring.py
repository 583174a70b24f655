"""The three questions a zero-shot harness asks of a language model, answered with the model's
own state: how likely is a continuation after a context, how likely is a whole text, and what
does it write after a prompt. No harness is imported here (``eval.zeroshot`` adapts this to
lm-evaluation-harness), so the arithmetic is tested on its own.

Conventions (those of lm-evaluation-harness): an empty context is the end-of-sequence token;
trailing spaces of a context belong to its continuation; a context too long for the window is
cut from the left; a whole text is scored in windows of ``max_length`` tokens, each window
starting from an empty state and every window after the first reading a full window of the
tokens before its predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nestlearn.generate import SamplingConfig, TextCodec, continue_ids
from nestlearn.models.base import LanguageModel


@dataclass(frozen=True)
class Window:
    """One window of a text: ``inputs`` are read, and their last ``len(targets)`` next-token
    predictions are scored against ``targets``."""

    inputs: list[int]
    targets: list[int]


def rolling_windows(tokens: Sequence[int], prefix: int, max_length: int) -> list[Window]:
    """Disjoint windows that predict every token of ``tokens`` once, after ``prefix``, reading
    at most ``max_length`` tokens each; the first reads from the start, the others a full window."""
    seq = [prefix, *tokens]
    windows = []
    start = 1
    while start < len(seq):
        end = min(start + max_length, len(seq))  # predict seq[start:end]
        lo = max(0, end - 1 - max_length)
        windows.append(Window(seq[lo:end - 1], seq[start:end]))
        start = end
    return windows


class Scorer:
    """Log-likelihoods and generations of ``model`` (eval mode, no gradients) over text."""

    def __init__(self, model: LanguageModel, tokenizer: TextCodec, max_length: int, batch_size: int = 1) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.device = next(model.parameters()).device

    def _ids(self, ids: Sequence[int]) -> Tensor:
        return torch.tensor([list(ids)], device=self.device)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens (trailing spaces of the context moved over)."""
        stripped = context.rstrip(" ")
        continuation = context[len(stripped):] + continuation
        ctx = self.tokenizer.encode(stripped) if stripped else [self.tokenizer.eos_id]
        return ctx, self.tokenizer.encode(continuation)

    @torch.no_grad()
    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding would write it) per pair.
        Pairs that share a context read it once: each continuation continues its state."""
        encoded = [self.encode_pair(c, x) for c, x in pairs]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(encoded):
            groups.setdefault(tuple(ctx), []).append(i)
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for ctx_key, members in groups.items():
            longest = max(len(encoded[i][1]) for i in members)
            if longest == 0:
                raise ValueError(f"a continuation encodes to no tokens: {pairs[members[0]]!r}")
            ctx = list(ctx_key)[-max(1, self.max_length + 1 - longest):]
            logits, state = self.model(self._ids(ctx), None)
            first = _wide(logits[0, -1:])
            for i in members:
                cont = encoded[i][1][-self.max_length:]
                rest = _wide(self.model(self._ids(cont[:-1]), state)[0][0]) if len(cont) > 1 else first[:0]
                out[i] = _score(torch.cat([first, rest]), cont)
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """log p(text) per text, over ``rolling_windows`` (windows of equal length are batched)."""
        jobs = [(i, w) for i, t in enumerate(texts)
                for w in rolling_windows(self.tokenizer.encode(t), self.tokenizer.eos_id, self.max_length)]
        totals = [0.0] * len(texts)
        jobs.sort(key=lambda job: len(job[1].inputs))
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start:start + self.batch_size]
            for length in sorted({len(w.inputs) for _, w in batch}):
                same = [(i, w) for i, w in batch if len(w.inputs) == length]
                logits = self.model(torch.tensor([w.inputs for _, w in same], device=self.device), None)[0]
                for row, (i, w) in enumerate(same):
                    totals[i] += _score(_wide(logits[row, -len(w.targets):]), w.targets)[0]
        return totals

    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """What the model writes after each context, until one of ``until`` (harness keyword
        arguments: ``until``, ``max_gen_toks``, ``do_sample``, ``temperature``)."""
        outputs = []
        for context, kwargs in requests:
            until = kwargs.get("until") or []
            sampling = SamplingConfig(
                max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                temperature=float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0,
                stop=tuple([until] if isinstance(until, str) else until))
            ids = self.tokenizer.encode(context) or [self.tokenizer.eos_id]
            ids = ids[-max(1, self.max_length - sampling.max_new_tokens):]
            outputs.append(continue_ids(self.model, self.tokenizer, ids, sampling))
        return outputs


def _wide(logits: Tensor) -> Tensor:
    """Logits in at least float32 (a bf16 model's log-softmax would lose the sums' digits)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _score(logits: Tensor, targets: Sequence[int]) -> tuple[float, bool]:
    """Summed log-probability of ``targets`` under ``logits`` (one row per target), and whether
    each target is the row's most likely token."""
    target = torch.tensor(list(targets), device=logits.device)
    logp = F.log_softmax(logits, dim=-1).gather(-1, target[:, None]).sum()
    return float(logp), bool((logits.argmax(-1) == target).all())
