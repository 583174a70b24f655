"""Formal-language generators: membership, samplers, legal-next targets against brute force."""

from __future__ import annotations

import functools
import itertools
import random
from collections import Counter

import pytest
import torch

from nestlearn.eval.formal import (
    END,
    LANGUAGES,
    PARITY_LABEL_TEST_BINS,
    PARITY_LABEL_TRAIN_RANGE,
    all_correct,
    encode,
    encode_targets,
    is_member,
    legal_next,
    member_lengths,
    next_char_targets,
    parity_label,
    sample_members,
    sample_parity_labels,
)

PERIOD = {"parity": 1, "aa_star": 2, "abab_star": 4, "anbn": 2, "anbncn": 3, "shuffle2": 2}


@pytest.mark.parametrize("name", sorted(LANGUAGES))
def test_samplers_give_members_in_range(name: str) -> None:
    spec = LANGUAGES[name]
    for lo, hi in (spec.train_range, *spec.test_bins, (1, 12)):
        strings = sample_members(name, 40, (lo, hi), random.Random(0))
        assert len(strings) == 40
        for s in strings:
            assert lo <= len(s) <= hi
            assert is_member(name, s), (name, s)


@pytest.mark.parametrize("name", sorted(LANGUAGES))
def test_sampler_hits_exact_lengths(name: str) -> None:
    for length in range(PERIOD[name], 13, PERIOD[name]):
        (s,) = sample_members(name, 1, (length, length), 3)
        assert len(s) == length and is_member(name, s)


def test_shuffle_sampler_produces_crossings() -> None:
    strings = sample_members("shuffle2", 200, (8, 8), 1)
    assert any("([)]" in s or "[(])" in s for s in strings)  # not only well-nested Dyck-2
    assert len(set(strings)) > 100


def test_shuffle_sampler_is_uniform_per_length() -> None:
    members = ["".join(t) for t in itertools.product("()[]", repeat=4) if is_member("shuffle2", "".join(t))]
    assert len(members) == 10  # C(4,0)·2 + C(4,2)·1 + C(4,4)·2
    counts = Counter(sample_members("shuffle2", 2000, (4, 4), 7))
    assert set(counts) == set(members)
    assert all(130 < c < 270 for c in counts.values()), counts  # expected 200 each


HAND = {
    "parity": (["", "0", "11", "0110", "101"], ["1", "010", "111"]),
    "aa_star": (["", "aa", "aaaa"], ["a", "aaa", "ab"]),
    "abab_star": (["", "abab", "abababab"], ["ab", "abba", "ababa", "baba", "aabb"]),
    "anbn": (["ab", "aabb", "aaabbb"], ["", "abab", "aab", "abb", "ba", "a", "abc"]),
    "anbncn": (["abc", "aabbcc"], ["", "abcabc", "aabbc", "abbc", "acb", "aabcbc", "ab"]),
    "shuffle2": (["", "()", "([)]", "[(])", "(()[])", "([])", "[[(]])"],
                 [")(", "(", "([)", "]", "(]", "([))"]),
}


@pytest.mark.parametrize("name", sorted(LANGUAGES))
def test_membership_by_hand(name: str) -> None:
    members, others = HAND[name]
    for s in members:
        assert is_member(name, s), (name, s)
    for s in others:
        assert not is_member(name, s), (name, s)


# Brute force: enumerate every string up to N symbols, keep the members, and call a symbol legal
# after a prefix when prefix + symbol is a prefix of one of them. Exact for member strings up to
# M symbols and for any prefix up to P symbols, where M and P are small enough that every
# legal continuation can be completed within N (e.g. Shuffle-2: a prefix of length i and open
# depth d plus one opening bracket needs i + 1 + d + 1 <= N symbols).
BOUNDS = {"parity": (12, 10, 10), "aa_star": (20, 18, 18), "abab_star": (14, 10, 10),
          "anbn": (14, 12, 6), "anbncn": (9, 6, 2), "shuffle2": (8, 6, 3)}


@functools.cache
def _brute(name: str) -> tuple[frozenset[str], frozenset[str]]:
    alphabet, (n_max, _, _) = LANGUAGES[name].alphabet, BOUNDS[name]
    members = {"".join(t) for n in range(n_max + 1) for t in itertools.product(alphabet, repeat=n)
               if is_member(name, "".join(t))}
    prefixes = {m[:i] for m in members for i in range(len(m) + 1)}
    return frozenset(members), frozenset(prefixes)


def _brute_legal(name: str, prefix: str) -> frozenset[str]:
    members, prefixes = _brute(name)
    legal = {ch for ch in LANGUAGES[name].alphabet if prefix + ch in prefixes}
    return frozenset(legal | ({END} if prefix in members else set()))


@pytest.mark.parametrize("name", sorted(LANGUAGES))
def test_legal_next_matches_brute_force(name: str) -> None:
    members, prefixes = _brute(name)
    small = [m for m in members if 0 < len(m) <= BOUNDS[name][1]]
    assert small
    symbols = LANGUAGES[name].alphabet + END
    for m in small:
        targets = next_char_targets(name, m)
        assert targets.shape == (len(m), len(symbols))
        for t in range(len(m)):
            want = _brute_legal(name, m[: t + 1])
            assert legal_next(name, m[: t + 1]) == want, (name, m[: t + 1])
            assert {symbols[i] for i in range(len(symbols)) if targets[t, i]} == want
    alphabet = LANGUAGES[name].alphabet
    for n in range(BOUNDS[name][2] + 1):  # every short string, incl. "" and non-prefixes (empty set)
        for t in itertools.product(alphabet, repeat=n):
            p = "".join(t)
            assert legal_next(name, p) == _brute_legal(name, p), (name, p)
            assert (p in prefixes) == bool(legal_next(name, p))


def test_legal_next_examples() -> None:
    assert legal_next("anbn", "aa") == {"a", "b"}
    assert legal_next("anbn", "aab") == {"b"}
    assert legal_next("anbn", "aabb") == {END}
    assert legal_next("anbncn", "aabbc") == {"c"}
    assert legal_next("anbncn", "aaab") == {"b"}
    for bad in ("aabc", "abcc", "aacb", "abbcc", "ba"):  # not prefixes of aⁿbⁿcⁿ
        assert legal_next("anbncn", bad) == frozenset(), bad
    assert legal_next("anbn", "abb") == frozenset()
    assert legal_next("shuffle2", "([") == {"(", "[", ")", "]"}
    assert legal_next("shuffle2", "([)") == {"(", "[", "]"}
    assert legal_next("shuffle2", ")") == frozenset()
    assert legal_next("parity", "1") == {"0", "1"}
    assert legal_next("abab_star", "aba") == {"b"}


def test_parity_labels() -> None:
    assert parity_label("1010100") == 1 and parity_label("01111") == 0 and parity_label("") == 0
    strings, labels = sample_parity_labels(200, PARITY_LABEL_TRAIN_RANGE, random.Random(5))
    assert all(1 <= len(s) <= 40 for s in strings)
    assert labels == [s.count("1") % 2 for s in strings]
    assert set(labels) == {0, 1}
    (lo, hi), = PARITY_LABEL_TEST_BINS
    test_strings, _ = sample_parity_labels(10, (lo, hi), 0)
    assert all(lo <= len(s) <= hi for s in test_strings)


def test_seeding_is_reproducible() -> None:
    for name in LANGUAGES:
        a = sample_members(name, 20, (2, 30), 123)
        b = sample_members(name, 20, (2, 30), random.Random(123))
        assert a == b
    state = random.getstate()
    assert sample_parity_labels(10, (1, 20), 9) == sample_parity_labels(10, (1, 20), 9)
    assert random.getstate() == state  # the global RNG is untouched
    assert sample_members("shuffle2", 20, (10, 20), 1) != sample_members("shuffle2", 20, (10, 20), 2)


def test_encode_and_targets() -> None:
    strings = ["ab", "aaabbb"]
    ids = encode("anbn", strings)
    assert ids.dtype == torch.long and ids.shape == (2, 6)
    assert ids[0].tolist() == [0, 1, 2, 2, 2, 2] and ids[1].tolist() == [0, 0, 0, 1, 1, 1]
    targets, mask = encode_targets("anbn", strings)
    assert targets.shape == (2, 6, 3) and mask.tolist() == [[True] * 2 + [False] * 4, [True] * 6]
    assert targets[0, :2].tolist() == [[1, 1, 0], [0, 0, 1]]
    assert targets[1].tolist() == [[1, 1, 0]] * 3 + [[0, 1, 0]] * 2 + [[0, 0, 1]]
    assert targets[0, 2:].abs().sum() == 0
    logits = targets * 2 - 1
    assert all_correct(logits, targets, mask).tolist() == [True, True]
    logits[1, 3, 0] = 1.0
    assert all_correct(logits, targets, mask).tolist() == [True, False]
    assert encode("shuffle2", ["([)]"], pad_id=-1).tolist() == [[0, 2, 1, 3]]


def test_member_lengths() -> None:
    assert member_lengths("abab_star", (51, 100)) == list(range(52, 101, 4))
    assert member_lengths("anbncn", (1, 10)) == [3, 6, 9]


@pytest.mark.parametrize(("call", "message"), [
    (lambda: is_member("dyck", "()"), "unknown language"),
    (lambda: sample_members("anbn", 1, (10, 5), 0), "1 <= min <= max"),
    (lambda: sample_members("anbn", 1, (0, 5), 0), "1 <= min <= max"),
    (lambda: sample_members("aa_star", 1, (3, 3), 0), "no member"),
    (lambda: sample_members("abab_star", 1, (5, 7), 0), "no member"),
    (lambda: sample_members("anbncn", 1, (4, 5), 0), "no member"),
    (lambda: sample_members("parity", -1, (1, 5), 0), "num"),
    (lambda: next_char_targets("anbn", "abab"), "not a member"),
    (lambda: encode("anbn", ["abc"]), "not in the alphabet"),
    (lambda: legal_next("shuffle2", "(x"), "not in the alphabet"),
    (lambda: parity_label("012"), "binary"),
    (lambda: sample_parity_labels(3, (5, 4), 0), "1 <= min <= max"),
])
def test_bad_arguments(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
