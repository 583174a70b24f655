"""The six synthetic tasks of MAD (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid
Architectures"), with the layouts, token conventions and published defaults of the reference
implementation (github.com/athms/mad-lab: ``mad/data/instances.py``, ``mad/configs.py``,
``configs/tasks/*.yml``).

- **in-context recall**: a stream of key-value pairs (keys from the lower half of the content
  vocabulary, values from the upper half; a key keeps its value within a sequence) ending with a
  probe pair; multi-query (the published setting) scores the value of every key seen before,
  single-query puts a copy token (``vocab_size - 1``) before the probe and scores only its value.
- **noisy in-context recall**: the same, with a share ``frac_noise`` of the pairs replaced by two
  tokens from a separate noise vocabulary (placed right above keys and values); never scored.
- **fuzzy in-context recall**: keys and values are motifs of 1…k and 1…v distinct tokens (keys
  always k tokens in the test layout), left-padded with a pad token to the sequence length.
- **selective copying**: ``num_tokens_to_copy`` tokens scattered among blank tokens
  (``vocab_size - 2``), then a copy token (``vocab_size - 1``) and as many blanks; at the blanks the
  model must emit the scattered tokens in order.
- **compression**: random tokens ending in a compression token (``vocab_size - 1``); the target is
  the sequence itself (the reference trains it with an encoder-decoder "autoencoder" backbone
  that must rebuild the sequence from the final token's state).
- **memorization**: pairs "key, insert token (``vocab_size - 1``)"; the target at the insert
  token is the key's value under one mapping fixed by ``kv_map_seed`` for every sequence, so it
  can only be learned into the weights.

Targets are ``IGNORE`` where the reference does not score. The three recall tasks take
``training=True`` for the reference's training layout (next-token targets at every position);
the default is its test layout. As in the reference, multi-query (noisy) in-context recall
sequences are ``seq_len - 1`` long (the probe pair closes an even-length stream that is then
shifted by one); ``MADSpec.width`` gives every task's width.

Departures from the reference:

- Randomness comes from the caller's ``torch.Generator``: the distributions are the reference's,
  the concrete draws are not (numpy's streams cannot be reproduced). For the same reason the
  memorization mapping is a different (equally random) injection drawn from
  ``torch.Generator().manual_seed(kv_map_seed)``, and selective copying places its blanks with the
  given generator (the reference uses numpy's unseeded global RNG there).
- In-context recall: the pair kept free of noise is drawn among the pairs before the probe (the
  reference can pick the probe slot, and then fails on an all-noise sequence).
- Fuzzy recall: the probe pair is put in before the body runs out even if its drawn position is
  not reached (the reference can then query a key it never showed); motifs are drawn as ordered
  draws without replacement rather than picked from an enumeration of all permutations (the same
  distribution, without building O(vocab^k) tuples per sequence).
- Memorization: the mapping covers the vocabulary less the noise tokens (the reference's config
  builds it over ``vocab_size - 1``, overlapping the noise tokens when ``noise_vocab_size > 0``);
  ``seq_len`` must be even and ``frac_noise < 1``.
- Compression keeps the reference's targets (the inputs, noise tokens included: the reference
  computes an ``IGNORE`` mask for noise positions and then returns the inputs instead); at the
  published setting (no noise) this makes no difference.
- Invalid settings raise ``ValueError`` where the reference asserts or fails later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from nestlearn.eval.mqar import IGNORE


@dataclass(frozen=True)
class MADTask:
    """One MAD setting. Field defaults are ``MADConfig``'s (``mad/configs.py``); each task's
    published baseline (``configs/tasks/<task>.yml``) is ``TASKS[name].defaults``. A task ignores
    the fields it does not use, as the reference does."""

    vocab_size: int = 16
    seq_len: int = 128
    num_train_examples: int = 12_800
    num_test_examples: int = 1_280
    multi_query: bool = True
    frac_noise: float = 0.0
    noise_vocab_size: int = 0
    k_motif_size: int = 1
    v_motif_size: int = 1
    num_tokens_to_copy: int = 0
    kv_map_seed: int = 12_345  # MADConfig.seed, which seeds the memorization mapping

    def __post_init__(self) -> None:
        _need(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        _need(self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}")
        _need(self.num_train_examples >= 1, f"num_train_examples must be >= 1, got {self.num_train_examples}")
        _need(self.num_test_examples >= 1, f"num_test_examples must be >= 1, got {self.num_test_examples}")
        _need(0.0 <= self.frac_noise < 1.0, f"frac_noise must be in [0, 1), got {self.frac_noise}")
        _need(self.noise_vocab_size >= 0, f"noise_vocab_size must be >= 0, got {self.noise_vocab_size}")
        _need(self.frac_noise == 0 or self.noise_vocab_size >= 1,
              f"noise_vocab_size must be >= 1 when frac_noise > 0, got {self.noise_vocab_size}")
        _need(self.k_motif_size >= 1, f"k_motif_size must be >= 1, got {self.k_motif_size}")
        _need(self.v_motif_size >= 1, f"v_motif_size must be >= 1, got {self.v_motif_size}")
        _need(self.num_tokens_to_copy >= 0, f"num_tokens_to_copy must be >= 0, got {self.num_tokens_to_copy}")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_count(num_examples: int) -> None:
    _need(num_examples >= 1, f"num_examples must be >= 1, got {num_examples}")


def _shift(stream: Tensor, scored: Tensor, training: bool) -> tuple[Tensor, Tensor]:
    """The reference's autoregressive shift: position t predicts stream token t + 1; training
    scores every next token, the test layout only the scored ones."""
    return stream[:, :-1], (stream if training else scored)[:, 1:]


# in-context recall (plain and noisy)


def recall_vocab(task: MADTask) -> tuple[range, range, range]:
    """Key, value and noise token ranges of (noisy) in-context recall: the copy token
    (``vocab_size - 1``, single-query only) and the noise tokens are carved off the top."""
    content = task.vocab_size - (0 if task.multi_query else 1) - task.noise_vocab_size
    half = content // 2
    return range(0, half), range(half, content), range(content, content + task.noise_vocab_size)


def in_context_recall(
    task: MADTask, num_examples: int, generator: torch.Generator, *, training: bool = False
) -> tuple[Tensor, Tensor]:
    """(Noisy) in-context recall: ``seq_len // 2 - 1`` pairs (each noise with chance
    ``frac_noise``, one kept real), then the probe pair of a key already shown."""
    _check_count(num_examples)
    keys_r, values_r, noise_r = recall_vocab(task)
    _need(task.seq_len % 2 == 0 and task.seq_len >= 4, f"seq_len must be even and >= 4, got {task.seq_len}")
    _need(len(keys_r) >= 1 and len(values_r) >= 1,
          f"vocab_size {task.vocab_size} leaves no key and value tokens besides the special and noise tokens")
    n, pairs, num_keys = num_examples, task.seq_len // 2 - 1, len(keys_r)
    rows = torch.arange(n)
    keys = torch.randint(0, num_keys, (n, pairs), generator=generator)
    # one value per key and sequence, drawn with replacement: the reference draws it when the key first shows
    table = torch.randint(values_r.start, values_r.stop, (n, num_keys), generator=generator)
    values = table.gather(1, keys)
    noise = torch.zeros(n, pairs, dtype=torch.bool)
    if task.frac_noise > 0:
        noise = torch.rand(n, pairs, generator=generator) < task.frac_noise
        noise[rows, torch.randint(0, pairs, (n,), generator=generator)] = False
    body = torch.stack([keys, values], dim=2)
    if task.frac_noise > 0:
        noise_tokens = torch.randint(noise_r.start, noise_r.stop, (n, pairs, 2), generator=generator)
        body = torch.where(noise[..., None], noise_tokens, body)
    # a value is scored (multi-query) where its key was shown in an earlier real pair
    bucket = torch.where(noise, num_keys, keys)
    position = torch.arange(pairs).expand(n, pairs)
    first = torch.full((n, num_keys + 1), pairs).scatter_reduce(1, bucket, position, reduce="amin")
    seen = (first.gather(1, keys) < position) & ~noise
    scored_values = torch.where(seen, values, IGNORE) if task.multi_query else torch.full_like(values, IGNORE)
    body_scored = torch.stack([torch.full_like(values, IGNORE), scored_values], dim=2)
    probe_key = torch.multinomial((first[:, :num_keys] < pairs).float(), 1, generator=generator)
    probe_value = table.gather(1, probe_key)
    ignore = torch.full((n, 1), IGNORE)
    tail = [probe_key, probe_value]
    tail_scored = [ignore, probe_value]
    if not task.multi_query:
        tail, tail_scored = [torch.full((n, 1), task.vocab_size - 1), *tail], [ignore, *tail_scored]
    stream = torch.cat([body.reshape(n, -1), *tail], dim=1)
    scored = torch.cat([body_scored.reshape(n, -1), *tail_scored], dim=1)
    return _shift(stream, scored, training)


# fuzzy in-context recall


class _Draws:
    """Uniform choices read off one block of float64 uniforms per sequence: one generator call
    per sequence instead of one per token keeps the sequential sampler fast."""

    def __init__(self, uniforms: list[float]) -> None:
        self._u = uniforms
        self._i = 0

    def _next(self) -> float:
        self._i += 1
        return self._u[self._i - 1]

    def below(self, n: int) -> int:
        return min(int(self._next() * n), n - 1)

    def chance(self, p: float) -> bool:
        return self._next() < p

    def motif(self, vocab: range, size: int) -> tuple[int, ...]:
        """``size`` distinct tokens of ``vocab`` in random order: a uniform pick among the
        reference's ``permutations(vocab, size)``."""
        pool = list(vocab)
        return tuple(pool.pop(self.below(len(pool))) for _ in range(size))

    def tokens(self, vocab: range, size: int) -> list[int]:
        return [vocab.start + self.below(len(vocab)) for _ in range(size)]


def fuzzy_vocab(task: MADTask) -> tuple[range, range, range, int]:
    """Key, value and noise ranges and the pad token of fuzzy recall: the pad token
    (``vocab_size - 1`` multi-query, else ``vocab_size - 2`` under the copy token) and the noise
    tokens are carved off the top."""
    content = task.vocab_size - (1 if task.multi_query else 2) - task.noise_vocab_size
    half = content // 2
    pad = task.vocab_size - (1 if task.multi_query else 2)
    return range(0, half), range(half, content), range(content, content + task.noise_vocab_size), pad


def _fuzzy_sequence(task: MADTask, draws: _Draws, training: bool) -> tuple[list[int], list[int]]:
    """One stream (``seq_len + 1`` tokens, left-padded) and its scored targets."""
    keys_r, values_r, noise_r, pad = fuzzy_vocab(task)
    k_max, v_max, seq_len = task.k_motif_size, task.v_motif_size, task.seq_len

    def key_size() -> int:
        return 1 + draws.below(k_max) if training else k_max

    probe_k = draws.motif(keys_r, key_size())
    probe_v = draws.motif(values_r, 1 + draws.below(v_max))
    probe_len = len(probe_k) + len(probe_v)
    probe_at = draws.below(seq_len - 2 * probe_len)
    body_end = seq_len - probe_len - (k_max + v_max)
    kv_map: dict[tuple[int, ...], tuple[int, ...]] = {probe_k: probe_v}  # a body key equal to the probe key takes its value
    shown: set[tuple[int, ...]] = set()
    inputs: list[int] = []
    scored: list[int] = []
    probe_added = False
    while len(inputs) < body_end:
        # the probe goes in at its drawn position, or now if the next item could end the body
        if not probe_added and (len(inputs) >= probe_at or len(inputs) + k_max + v_max >= body_end):
            inputs += [*probe_k, *probe_v]
            scored += [IGNORE] * probe_len
            shown.add(probe_k)
            probe_added = True
            continue
        k_size, v_size = key_size(), 1 + draws.below(v_max)
        if task.frac_noise > 0 and draws.chance(task.frac_noise):
            inputs += draws.tokens(noise_r, k_size + v_size)
            scored += [IGNORE] * (k_size + v_size)
            continue
        key = draws.motif(keys_r, k_size)
        if key == probe_k:
            probe_added = True
        if key not in kv_map:
            kv_map[key] = draws.motif(values_r, v_size)
        value = kv_map[key]
        inputs += [*key, *value]
        answer = list(value) if task.multi_query and key in shown else [IGNORE] * len(value)
        scored += [IGNORE] * k_size + answer
        shown.add(key)
    if not task.multi_query:
        inputs.append(task.vocab_size - 1)
        scored.append(IGNORE)
    inputs += [*probe_k, *probe_v]
    scored += [IGNORE] * len(probe_k) + list(probe_v)
    padding = seq_len + 1 - len(inputs)
    return [pad] * padding + inputs, [IGNORE] * padding + scored


def fuzzy_in_context_recall(
    task: MADTask, num_examples: int, generator: torch.Generator, *, training: bool = False
) -> tuple[Tensor, Tensor]:
    """Fuzzy in-context recall: key and value motifs of variable length, so a model must find
    where a key ends; in the test layout every key has ``k_motif_size`` tokens."""
    _check_count(num_examples)
    keys_r, values_r, _, _ = fuzzy_vocab(task)
    k_max, v_max = task.k_motif_size, task.v_motif_size
    _need(len(keys_r) >= k_max,
          f"k_motif_size {k_max} needs as many distinct key tokens, vocab_size {task.vocab_size} gives {len(keys_r)}")
    _need(len(values_r) >= v_max,
          f"v_motif_size {v_max} needs as many distinct value tokens, vocab_size {task.vocab_size} gives "
          f"{len(values_r)}")
    _need(task.seq_len > 2 * (k_max + v_max),
          f"seq_len must be > 2 * (k_motif_size + v_motif_size) = {2 * (k_max + v_max)}, got {task.seq_len}")
    # every item (probe, pair, noise) takes >= 2 tokens and <= 3 + k + v uniforms
    per_sequence = (task.seq_len // 2 + 2) * (3 + k_max + v_max)
    streams, scored = [], []
    for _ in range(num_examples):
        draws = _Draws(torch.rand(per_sequence, dtype=torch.float64, generator=generator).tolist())
        stream, targets = _fuzzy_sequence(task, draws, training)
        streams.append(stream)
        scored.append(targets)
    return _shift(torch.tensor(streams), torch.tensor(scored), training)


# selective copying


def selective_copying(
    task: MADTask, num_examples: int, generator: torch.Generator, *, training: bool = False
) -> tuple[Tensor, Tensor]:
    """Selective copying: the tokens to copy, each preceded by a random number of blanks (the
    blanks land before tokens, never after the last), a copy token, then one blank per token,
    at which the tokens are the targets. ``training`` has no effect (one layout, as in the
    reference)."""
    _check_count(num_examples)
    copy = task.num_tokens_to_copy
    _need(copy >= 1, f"num_tokens_to_copy must be >= 1, got {copy}")
    _need(task.seq_len > 2 * copy + 1,
          f"seq_len must be > 2 * num_tokens_to_copy + 1 = {2 * copy + 1}, got {task.seq_len}")
    _need(task.vocab_size >= 3, f"vocab_size must be >= 3 (content, blank and copy tokens), got {task.vocab_size}")
    n, blank = num_examples, task.vocab_size - 2
    spread = task.seq_len - 2 * copy - 1  # blanks among the tokens to copy
    tokens = torch.randint(0, blank, (n, copy), generator=generator)
    before = torch.randint(0, copy, (n, spread), generator=generator)  # each blank goes before token `before`
    counts = torch.zeros(n, copy, dtype=torch.long).scatter_add_(1, before, torch.ones_like(before))
    inputs = torch.full((n, task.seq_len), blank)
    inputs.scatter_(1, torch.arange(copy) + counts.cumsum(1), tokens)
    inputs[:, copy + spread] = task.vocab_size - 1
    targets = torch.full((n, task.seq_len), IGNORE)
    targets[:, copy + spread + 1:] = tokens
    return inputs, targets


# compression


def compression(
    task: MADTask, num_examples: int, generator: torch.Generator, *, training: bool = False
) -> tuple[Tensor, Tensor]:
    """Compression: ``seq_len - 1`` random tokens (each a noise token with chance
    ``frac_noise``) and the compression token; the target is the input. ``training`` has no
    effect."""
    _check_count(num_examples)
    content = task.vocab_size - 1 - task.noise_vocab_size
    _need(content >= 1, f"vocab_size {task.vocab_size} leaves no content tokens besides the special and noise tokens")
    n, body = num_examples, task.seq_len - 1
    tokens = torch.randint(0, content, (n, body), generator=generator)
    if task.frac_noise > 0:
        noisy = torch.rand(n, body, generator=generator) < task.frac_noise
        noise = torch.randint(content, content + task.noise_vocab_size, (n, body), generator=generator)
        tokens = torch.where(noisy, noise, tokens)
    inputs = torch.cat([tokens, torch.full((n, 1), task.vocab_size - 1)], dim=1)
    return inputs, inputs.clone()


# memorization


def memorization_values(task: MADTask) -> Tensor:
    """The fixed mapping: entry ``k`` is key ``k``'s value. It depends on ``vocab_size``,
    ``noise_vocab_size`` and ``kv_map_seed`` only, so it is the same in every sequence and split."""
    content = task.vocab_size - 1 - task.noise_vocab_size
    half = content // 2
    _need(half >= 1, f"vocab_size {task.vocab_size} leaves no key and value tokens besides the special and noise tokens")
    shuffle = torch.Generator().manual_seed(task.kv_map_seed)
    return half + torch.randperm(content - half, generator=shuffle)[:half]


def memorization(
    task: MADTask, num_examples: int, generator: torch.Generator, *, training: bool = False
) -> tuple[Tensor, Tensor]:
    """Memorization: ``seq_len // 2`` items "key, insert token" (each two noise tokens with
    chance ``frac_noise``, one kept real); the target at the insert token is the key's fixed value.
    ``training`` has no effect."""
    _check_count(num_examples)
    _need(task.seq_len % 2 == 0, f"seq_len must be even, got {task.seq_len}")
    table = memorization_values(task)
    n, pairs = num_examples, task.seq_len // 2
    content = task.vocab_size - 1 - task.noise_vocab_size
    keys = torch.randint(0, len(table), (n, pairs), generator=generator)
    inputs = torch.stack([keys, torch.full_like(keys, task.vocab_size - 1)], dim=2)
    targets = torch.stack([torch.full_like(keys, IGNORE), table[keys]], dim=2)
    if task.frac_noise > 0:
        noise = torch.rand(n, pairs, generator=generator) < task.frac_noise
        noise[torch.arange(n), torch.randint(0, pairs, (n,), generator=generator)] = False
        tokens = torch.randint(content, content + task.noise_vocab_size, (n, pairs, 2), generator=generator)
        inputs = torch.where(noise[..., None], tokens, inputs)
        targets = torch.where(noise[..., None], IGNORE, targets)
    return inputs.reshape(n, -1), targets.reshape(n, -1)


# registry


class MADGenerator(Protocol):
    def __call__(
        self, task: MADTask, num_examples: int, generator: torch.Generator, *, training: bool = False
    ) -> tuple[Tensor, Tensor]: ...


def _full_width(task: MADTask) -> int:
    return task.seq_len


def _recall_width(task: MADTask) -> int:
    return task.seq_len - 1 if task.multi_query else task.seq_len


@dataclass(frozen=True)
class MADSpec:
    """A task's generator, its published baseline and the width of the sequences it makes."""

    generate: MADGenerator
    defaults: MADTask
    width: Callable[[MADTask], int] = _full_width


TASKS: dict[str, MADSpec] = {
    "in_context_recall": MADSpec(
        in_context_recall, MADTask(vocab_size=16, seq_len=128, multi_query=True), _recall_width
    ),
    "fuzzy_in_context_recall": MADSpec(
        fuzzy_in_context_recall, MADTask(vocab_size=16, seq_len=128, multi_query=True, k_motif_size=3, v_motif_size=3)
    ),
    "noisy_in_context_recall": MADSpec(
        in_context_recall,
        MADTask(vocab_size=32, seq_len=128, multi_query=True, noise_vocab_size=16, frac_noise=0.2),
        _recall_width,
    ),
    "selective_copying": MADSpec(selective_copying, MADTask(vocab_size=16, seq_len=256, num_tokens_to_copy=16)),
    "compression": MADSpec(compression, MADTask(vocab_size=16, seq_len=32)),
    "memorization": MADSpec(memorization, MADTask(vocab_size=256, seq_len=32, num_train_examples=256)),
}
