"""Formal-language recognition tasks of the Titans / Nested Learning tables: parity, (aa)*, (abab)*,
aⁿbⁿ, aⁿbⁿcⁿ and Shuffle-2.

Sources. The languages and the character-prediction task are those of Bhattamishra, Ahuja & Goyal
2020, "On the Ability and Limitations of Transformers to Recognize Formal Languages" (repository
satwik77/Transformer-Formal-Languages: ``src/utils/parity_generator.py``,
``nonstarfree_generator.py`` for (aa)* and (abab)*, ``data_generator.py`` for the counter languages
aⁿbⁿ and aⁿbⁿcⁿ, ``shuffle_generator.py`` for Shuffle-2, lengths in ``generate_data.py``,
``src/args.py`` and the README). Parity as sequence-to-label is Delétang et al. 2023, "Neural
Networks and the Chomsky Hierarchy" (google-deepmind/neural_networks_chomsky_hierarchy,
``tasks/regular/parity_check.py``, lengths in ``training/example.py`` and the paper).

Languages (alphabets as in the source): parity = binary strings over ``01`` with an even number of
1s (the empty string included); (aa)* over ``a``; (abab)* over ``ab``; aⁿbⁿ and aⁿbⁿcⁿ with n ≥ 1
(the source's counter languages start at n = 1); Shuffle-2 over ``()[]`` = the strings whose ``()``
subsequence and ``[]`` subsequence are each a Dyck-1 word (``([)]`` is a member, ``)(`` is not).

Character prediction. After reading each prefix ``s[:t+1]`` of a member ``s`` the model predicts,
independently per symbol, which symbols may come next: a symbol is legal when the prefix plus it is
still a prefix of some member, and the end symbol ``END`` is legal when the prefix itself is a
member. Targets are multi-hot over ``alphabet + END`` (``(T, |alphabet|+1)``), a string counts as
correct only if every position is. This is the source's task: for the counter languages its
output vocabulary is the alphabet plus a termination symbol ``T`` with exactly these sets; for
Shuffle-2 it marks opening brackets always legal and a closing bracket legal while its type is
open (it has no end column; we add one); for parity, (aa)* and (abab)* it emits one bit per
prefix (is the prefix a member), which is our ``END`` column.

Parity as sequence-to-label (Delétang et al.): uniform random bits, label = (number of 1s) mod 2
(1 = odd), trained on lengths 1–40 and tested on 41–500 (their example script tests up to 100).

Lengths (string lengths; the source's counter windows are in n and are converted here):
    parity, (aa)*, (abab)*: train 2–50, test bins 51–100, 101–150 (lengths no member can have are
        skipped: (aa)* draws even lengths, (abab)* multiples of 4; the range is the repository's
        README example, not checked against the paper's table);
    Shuffle-2: train 2–50, test bins 52–100, 102–150 (README command ``-lower_window 2
        -upper_window 50 -bins 2 -len_incr 50``; Shuffle's first bin starts at upper + 2);
    aⁿbⁿ, aⁿbⁿcⁿ: n in 1–50 for training, bins n in 51–100 and 101–150, i.e. lengths 2–100 /
        102–200 / 202–300 and 3–150 / 153–300 / 303–450.
The repository fixes no per-language window in code: the training window 2–50 (n 1–50) is its
README command, and the bins follow ``generate_data.py`` (first bin from upper + 1, or + 2 for
Shuffle, then ``len_incr`` = 50 wide); the paper's own table was not checked against.

Departures. (1) Test bins are disjoint: the source's second bin starts at the first one's upper
end (100), so length 100 (n = 100 for the counter languages) falls in both. (2) Lengths are drawn
uniformly over the member lengths in the range, and a string uniformly among the members of that
length; the source draws parity strings by a stopping process, and Shuffle-2 from a PCFG over
properly nested brackets (S → (S) | [S] | SS | ε), which never yields crossings such as ``([)]``
although they are members; we sample the whole shuffle language. (3) Parity, (aa)* and (abab)*
get the full multi-hot targets rather than the source's single membership bit (that bit is the
``END`` column). (4) The empty string is never sampled (length ranges start at 1).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

END = "$"  # the end-of-string symbol of the targets; in no alphabet

Range = tuple[int, int]


@dataclass(frozen=True)
class LanguageSpec:
    """A language's alphabet and its train/test string-length ranges (inclusive)."""

    alphabet: str
    train_range: Range
    test_bins: tuple[Range, ...]
    source: str


_BHATTA = "satwik77/Transformer-Formal-Languages"
LANGUAGES: dict[str, LanguageSpec] = {
    "parity": LanguageSpec("01", (2, 50), ((51, 100), (101, 150)), f"{_BHATTA} parity_generator.py"),
    "aa_star": LanguageSpec("a", (2, 50), ((51, 100), (101, 150)), f"{_BHATTA} nonstarfree_generator.py"),
    "abab_star": LanguageSpec("ab", (2, 50), ((51, 100), (101, 150)),
                              f"{_BHATTA} nonstarfree_generator.py"),
    "anbn": LanguageSpec("ab", (2, 100), ((102, 200), (202, 300)), f"{_BHATTA} data_generator.py"),
    "anbncn": LanguageSpec("abc", (3, 150), ((153, 300), (303, 450)), f"{_BHATTA} data_generator.py"),
    "shuffle2": LanguageSpec("()[]", (2, 50), ((52, 100), (102, 150)), f"{_BHATTA} shuffle_generator.py"),
}

# Delétang et al.'s parity_check: train lengths 1–40, evaluation on 41–500.
PARITY_LABEL_TRAIN_RANGE: Range = (1, 40)
PARITY_LABEL_TEST_BINS: tuple[Range, ...] = ((41, 500),)


def _spec(name: str) -> LanguageSpec:
    if name not in LANGUAGES:
        raise ValueError(f"unknown language {name!r}; expected one of {sorted(LANGUAGES)}")
    return LANGUAGES[name]


def _check_symbols(name: str, string: str) -> None:
    alphabet = _spec(name).alphabet
    bad = sorted(set(string) - set(alphabet))
    if bad:
        raise ValueError(f"symbols {bad} are not in the alphabet {alphabet!r} of {name!r}")


def _runs(string: str, letters: str) -> list[int] | None:
    """Counts of each letter if ``string`` is letters[0]^i letters[1]^j … in order, else None."""
    counts, pos = [], 0
    for ch in letters:
        start = pos
        while pos < len(string) and string[pos] == ch:
            pos += 1
        counts.append(pos - start)
    return counts if pos == len(string) else None


def _shuffle_depths(string: str) -> tuple[int, int] | None:
    """Open depth of ``()`` and ``[]`` after ``string``, or None once either goes negative."""
    round_, square = 0, 0
    for ch in string:
        round_ += {"(": 1, ")": -1}.get(ch, 0)
        square += {"[": 1, "]": -1}.get(ch, 0)
        if round_ < 0 or square < 0:
            return None
    return round_, square


def is_member(name: str, string: str) -> bool:
    """Exact membership by counting (no regular expressions, no reference to the samplers)."""
    spec = _spec(name)
    if set(string) - set(spec.alphabet):
        return False
    if name == "parity":
        return string.count("1") % 2 == 0
    if name == "aa_star":
        return len(string) % 2 == 0
    if name == "abab_star":
        return len(string) % 4 == 0 and all(ch == "ab"[i % 2] for i, ch in enumerate(string))
    if name in ("anbn", "anbncn"):
        counts = _runs(string, spec.alphabet)
        return counts is not None and counts[0] >= 1 and len(set(counts)) == 1
    depths = _shuffle_depths(string)
    return depths == (0, 0)


def legal_next(name: str, prefix: str) -> frozenset[str]:
    """Symbols (``END`` included) after which ``prefix`` can still be completed to a member.

    Empty when ``prefix`` is not a prefix of any member.
    """
    _check_symbols(name, prefix)
    n = len(prefix)
    if name == "parity":
        return frozenset("01" + (END if prefix.count("1") % 2 == 0 else ""))
    if name == "aa_star":
        return frozenset("a" + (END if n % 2 == 0 else ""))
    if name == "abab_star":
        if any(ch != "ab"[i % 2] for i, ch in enumerate(prefix)):
            return frozenset()
        return frozenset("ab"[n % 2] + (END if n % 4 == 0 else ""))
    if name in ("anbn", "anbncn"):
        return _counter_next(_spec(name).alphabet, prefix)
    depths = _shuffle_depths(prefix)
    if depths is None:
        return frozenset()
    legal = {"(", "["} | ({")"} if depths[0] else set()) | ({"]"} if depths[1] else set())
    return frozenset(legal | ({END} if depths == (0, 0) else set()))


def _counter_next(letters: str, prefix: str) -> frozenset[str]:
    """aⁿbⁿ(cⁿ), n ≥ 1: a's until the first b fixes n, then every later letter is forced."""
    counts = _runs(prefix, letters)
    if counts is None:
        return frozenset()
    n, rest = counts[0], counts[1:]
    if not any(rest):
        return frozenset("a" if n == 0 else "ab")
    if any(c > n for c in rest):
        return frozenset()
    for i, c in enumerate(rest):
        if c < n:  # the first unfinished block continues, and no later block may have started
            return frozenset(letters[i + 1]) if not any(rest[i + 1:]) else frozenset()
    return frozenset(END)


def next_char_targets(name: str, string: str) -> Tensor:
    """Multi-hot ``(len(string), |alphabet|+1)``: row t = legal_next(string[:t+1]), END last."""
    if not is_member(name, string):
        raise ValueError(f"{string!r} is not a member of {name!r}")
    symbols = _spec(name).alphabet + END
    out = torch.zeros(len(string), len(symbols))
    for t in range(len(string)):
        for ch in legal_next(name, string[: t + 1]):
            out[t, symbols.index(ch)] = 1.0
    return out


def _check_range(length_range: Range) -> Range:
    lo, hi = length_range
    if lo < 1 or lo > hi:
        raise ValueError(f"length range must satisfy 1 <= min <= max, got [{lo}, {hi}]")
    return lo, hi


def member_lengths(name: str, length_range: Range) -> list[int]:
    """The lengths in ``length_range`` that some member of ``name`` has."""
    _spec(name)
    lo, hi = _check_range(length_range)
    period = {"parity": 1, "aa_star": 2, "abab_star": 4, "anbn": 2, "anbncn": 3, "shuffle2": 2}[name]
    lengths = [n for n in range(lo, hi + 1) if n % period == 0]
    if not lengths:
        raise ValueError(f"no member of {name!r} has a length in [{lo}, {hi}] (lengths are multiples of {period})")
    return lengths


def _dyck1(k: int, rng: random.Random) -> list[int]:
    """Uniform Dyck-1 word with k pairs as ±1 steps (cycle lemma: one rotation of k ups and k+1
    downs starts right after the first minimum and is a Dyck word followed by a down step)."""
    steps = [1] * k + [-1] * (k + 1)
    rng.shuffle(steps)
    total, low, cut = 0, 0, 0
    for i, s in enumerate(steps):
        total += s
        if total < low:
            low, cut = total, i + 1
    rotated = steps[cut:] + steps[:cut]
    return rotated[:-1]


def _shuffle2(length: int, rng: random.Random) -> str:
    """Uniform member of Shuffle-2 of the given (even) length: choose how many ``()`` pairs with
    weight C(L, 2k)·Cat(k)·Cat(m−k), their positions, then a uniform Dyck word for each type."""
    m = length // 2

    def catalan(j: int) -> int:
        return math.comb(2 * j, j) // (j + 1)

    weights = [math.comb(length, 2 * k) * catalan(k) * catalan(m - k) for k in range(m + 1)]
    r = rng.randrange(sum(weights))
    k = 0
    while r >= weights[k]:
        r -= weights[k]
        k += 1
    round_positions = set(rng.sample(range(length), 2 * k))
    round_steps, square_steps = iter(_dyck1(k, rng)), iter(_dyck1(m - k, rng))
    out = []
    for i in range(length):
        if i in round_positions:
            out.append("(" if next(round_steps) > 0 else ")")
        else:
            out.append("[" if next(square_steps) > 0 else "]")
    return "".join(out)


def _member_of_length(name: str, length: int, rng: random.Random) -> str:
    if name == "parity":
        bits = [rng.choice("01") for _ in range(length - 1)]
        return "".join(bits) + ("1" if bits.count("1") % 2 else "0")
    if name == "aa_star":
        return "a" * length
    if name == "abab_star":
        return "ab" * (length // 2)
    if name in ("anbn", "anbncn"):
        letters = _spec(name).alphabet
        return "".join(ch * (length // len(letters)) for ch in letters)
    return _shuffle2(length, rng)


def _as_rng(rng: random.Random | int) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def sample_members(name: str, num: int, length_range: Range, rng: random.Random | int) -> list[str]:
    """``num`` members with lengths uniform over the member lengths in ``length_range``.

    ``rng`` is a ``random.Random`` (advanced in place) or an int seed; the global RNG is never used.
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    lengths = member_lengths(name, length_range)
    gen = _as_rng(rng)
    return [_member_of_length(name, gen.choice(lengths), gen) for _ in range(num)]


def parity_label(string: str) -> int:
    """Delétang et al.'s parity_check class: number of 1s mod 2 (0 = even, 1 = odd)."""
    if set(string) - {"0", "1"}:
        raise ValueError(f"parity strings are binary, got {string!r}")
    return string.count("1") % 2


def sample_parity_labels(num: int, length_range: Range, rng: random.Random | int) -> tuple[list[str], list[int]]:
    """Uniform random bit strings (length uniform in the range) and their parity labels."""
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    lo, hi = _check_range(length_range)
    gen = _as_rng(rng)
    strings = ["".join(gen.choice("01") for _ in range(gen.randint(lo, hi))) for _ in range(num)]
    return strings, [parity_label(s) for s in strings]


def encode(name: str, strings: Sequence[str], pad_id: int | None = None) -> Tensor:
    """Token ids ``(B, T)``: a symbol's index in the alphabet; padding ``pad_id`` (default
    ``len(alphabet)``, so an embedding of ``len(alphabet) + 1`` rows covers it)."""
    alphabet = _spec(name).alphabet
    pad = len(alphabet) if pad_id is None else pad_id
    width = max((len(s) for s in strings), default=0)
    out = torch.full((len(strings), width), pad, dtype=torch.long)
    for b, s in enumerate(strings):
        _check_symbols(name, s)
        out[b, : len(s)] = torch.tensor([alphabet.index(ch) for ch in s], dtype=torch.long)
    return out


def encode_targets(name: str, strings: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Multi-hot targets ``(B, T, |alphabet|+1)`` (zeros at padding) and the mask ``(B, T)`` of
    real positions, for member strings."""
    size = len(_spec(name).alphabet) + 1
    width = max((len(s) for s in strings), default=0)
    targets = torch.zeros(len(strings), width, size)
    mask = torch.zeros(len(strings), width, dtype=torch.bool)
    for b, s in enumerate(strings):
        targets[b, : len(s)] = next_char_targets(name, s)
        mask[b, : len(s)] = True
    return targets, mask


def all_correct(logits: Tensor, targets: Tensor, mask: Tensor, threshold: float = 0.0) -> Tensor:
    """Per-string success ``(B,)``: every real position's thresholded multi-hot prediction
    (``logits > threshold``, i.e. sigmoid > 0.5 by default) equals its target set."""
    pred = logits > threshold
    ok = (pred == targets.bool()).all(dim=-1) | ~mask
    return ok.all(dim=-1)

