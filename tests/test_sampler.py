"""The C++ sampler (`_core.Sampler`, csrc/sampler.cpp) against a numpy reference of llama.cpp's
default chain: repeat penalty -> top-k -> top-p -> min-p -> temperature -> draw.

The reference follows llama.cpp's order literally (min-p after top-p, top-p on the
temperature-1 probabilities of the top-k survivors), so it also checks the C++ shortcut of
applying min-p before the top-p walk.

Statistics: each distribution test draws N = 20000 tokens with a fixed seed and checks every
token's count against its binomial expectation, |count - N p| <= 5 sqrt(N p (1 - p)) + 1.
A correct sampler exceeds 5 sigma for one token with probability about 6e-7, so with about a
hundred checked tokens in this file a failure for an arbitrary seed would be a 1e-4 event;
the fixed seed makes the outcome deterministic. At N = 20000 the bound is about 10% of a
probability of 0.1, far less than the change any misordered or missing filter makes here.
Tokens the filters drop must never be drawn at all.
"""

from __future__ import annotations

import numpy as np
import pytest

from llamacpu import _core

N_DRAWS = 20000
NO_RECENT = np.zeros(0, np.int32)
OFF = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)


def reference_probs(logits, temperature, top_k, top_p, min_p, repeat_penalty, recent=()):
    """Probability of each token under llama.cpp's chain, float64."""
    l = np.array(logits, np.float32)
    n = len(l)
    if repeat_penalty != 1.0:
        rp = np.float32(repeat_penalty)
        for t in set(int(t) for t in recent):  # each distinct token once
            if 0 <= t < n:
                l[t] = l[t] / rp if l[t] > 0 else l[t] * rp
    probs = np.zeros(n)
    if temperature <= 0:
        probs[int(np.argmax(l))] = 1.0
        return probs
    order = np.lexsort((np.arange(n), -l.astype(np.float64)))  # larger logit, then smaller index
    if 0 < top_k < n:
        order = order[:top_k]
    if top_p < 1.0:
        p = softmax(l[order])
        cum = np.cumsum(p)
        order = order[:int(np.argmax(cum >= top_p)) + 1 if cum[-1] >= top_p else len(order)]
    if min_p > 0.0:
        threshold = l[order[0]] + np.float32(np.log(min_p))  # p >= min_p * p_max
        order = order[l[order] >= threshold]
    probs[order] = softmax(l[order] / np.float64(np.float32(temperature)))
    return probs


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def draw(sampler, logits, n, recent=NO_RECENT, **params):
    p = {**OFF, **params}
    logits = np.asarray(logits, np.float32)
    return np.array([sampler.sample(logits, p["temperature"], p["top_k"], p["top_p"], p["min_p"],
                                    p["repeat_penalty"], recent) for _ in range(n)])


def assert_matches_distribution(tokens, probs):
    counts = np.bincount(tokens, minlength=len(probs))
    n = len(tokens)
    dropped = probs == 0
    assert counts[dropped].sum() == 0, f"drew dropped tokens {np.flatnonzero(dropped & (counts > 0))}"
    allowed = 5 * np.sqrt(n * probs * (1 - probs)) + 1
    excess = np.abs(counts - n * probs) - allowed
    assert np.all(excess <= 0), f"counts {counts} vs expected {np.round(n * probs)}"


# 12 tokens; the smallest probability at temperature 1 is about 0.6%, so every token shows up
# about 120 times when nothing is filtered.
LOGITS = np.array([1.2, 3.1, -0.4, 2.7, 0.3, 2.2, -1.5, 1.9, 0.8, -2.0, 2.95, 0.0], np.float32)
RECENT = np.array([1, 10, 10, 4, 77777, -3], np.int32)  # duplicates and out-of-range ids

DISTRIBUTION_CASES = {
    "unfiltered": dict(OFF),
    "cold": dict(OFF, temperature=0.5),
    "hot": dict(OFF, temperature=2.0),
    "top_k": dict(OFF, top_k=5),
    # Top-p sees the temperature-1 probabilities: at temperature 1.5 the kept set differs from
    # the one the hot distribution would give.
    "top_p": dict(OFF, top_p=0.7, temperature=1.5),
    "min_p": dict(OFF, min_p=0.1, temperature=0.8),
    "penalty": dict(OFF, repeat_penalty=1.5, recent=RECENT),
    "defaults": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1, recent=RECENT),
    "combined": dict(temperature=0.7, top_k=8, top_p=0.9, min_p=0.05, repeat_penalty=1.3,
                     recent=np.array([3, 0], np.int32)),
}


@pytest.mark.parametrize("case", DISTRIBUTION_CASES)
def test_distribution_matches_reference(case):
    params = dict(DISTRIBUTION_CASES[case])
    recent = params.pop("recent", NO_RECENT)
    probs = reference_probs(LOGITS, recent=recent, **params)
    tokens = draw(_core.Sampler(1234), LOGITS, N_DRAWS, recent=recent, **params)
    assert_matches_distribution(tokens, probs)


def test_unfiltered_keeps_every_token():
    # top_k = 0, top_p = 1 and min_p = 0 turn every filter off.
    tokens = draw(_core.Sampler(7), LOGITS, N_DRAWS, **OFF)
    assert set(tokens) == set(range(len(LOGITS)))


def test_top_p_uses_temperature_one_probabilities():
    # Guards the reference itself: applying temperature before top-p would keep another set,
    # so the "top_p" distribution case tells the two orders apart.
    p = DISTRIBUTION_CASES["top_p"]
    kept = reference_probs(LOGITS, **p) > 0
    hot_first = reference_probs(LOGITS / np.float32(p["temperature"]), **dict(p, temperature=1.0)) > 0
    assert kept.sum() != hot_first.sum()


def test_large_vocabulary_with_default_filters():
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(32000) * 2.5).astype(np.float32)
    recent = rng.integers(0, 32000, 64).astype(np.int32)
    params = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1)
    probs = reference_probs(logits, recent=recent, **params)
    assert 1 < np.count_nonzero(probs) <= 40
    tokens = draw(_core.Sampler(99), logits, 5000, recent=recent, **params)
    assert_matches_distribution(tokens, probs)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_greedy_is_first_argmax(temperature):
    rng = np.random.default_rng(3)
    sampler = _core.Sampler(0)
    for _ in range(50):
        logits = rng.integers(-3, 4, 50).astype(np.float32)  # many ties
        # Filters do not matter for greedy: it is the first index of the largest logit.
        got = sampler.sample(logits, temperature, 5, 0.5, 0.2, 1.0, NO_RECENT)
        assert got == int(np.argmax(logits))


def greedy(logits, penalty, recent):
    return _core.Sampler(0).sample(np.asarray(logits, np.float32), 0.0, 0, 1.0, 0.0, penalty,
                                   np.asarray(recent, np.int32))


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    # Positive: 5 / 1.1 = 4.55 falls below 4.8.
    assert greedy([0, 0, 0, 5.0, 0, 0, 0, 4.8], 1.1, [3]) == 7
    # Negative: -1 * 1.1 = -1.1 falls below -1.05 (dividing would have raised it to -0.91).
    assert greedy([-3, -3, -1.0, -3, -3, -1.05], 1.1, [2]) == 5
    # Without the token in the window, or with the penalty off, nothing changes.
    assert greedy([0, 0, 0, 5.0, 0, 0, 0, 4.8], 1.1, [7]) == 3
    assert greedy([0, 0, 0, 5.0, 0, 0, 0, 4.8], 1.0, [3]) == 3


def test_repeat_penalty_counts_each_token_once():
    # Once: 5 / 1.5 = 3.33 still beats 3; three times would give 1.48.
    assert greedy([0, 0, 0, 5.0, 0, 0, 0, 3.0], 1.5, [3, 3, 3]) == 3
    # Ids outside the vocabulary are ignored.
    assert greedy([0, 0, 0, 5.0, 0, 0, 0, 3.0], 1.5, [-1, 8, 1 << 30]) == 3


NARROW = {
    "top_k=1": dict(top_k=1, temperature=1.5),
    "top_p=tiny": dict(top_p=1e-6, temperature=1.5),
    "min_p=1": dict(min_p=1.0, temperature=1.5),
    "temperature=tiny": dict(temperature=1e-4),
}


@pytest.mark.parametrize("case", NARROW)
def test_narrow_filters_leave_only_the_argmax(case):
    tokens = draw(_core.Sampler(11), LOGITS, 2000, **NARROW[case])
    assert set(tokens) == {int(np.argmax(LOGITS))}


def test_min_p_one_keeps_tied_maxima():
    logits = np.array([0.5, 2.0, 1.0, 2.0, -1.0], np.float32)
    tokens = draw(_core.Sampler(5), logits, 4000, min_p=1.0)
    assert_matches_distribution(tokens, reference_probs(logits, **dict(OFF, min_p=1.0)))
    assert set(tokens) == {1, 3}


def test_top_k_breaks_ties_by_smaller_index():
    logits = np.array([1.0, 2.0, 2.0, 2.0, 0.0], np.float32)
    tokens = draw(_core.Sampler(5), logits, 4000, top_k=2)
    assert set(tokens) == {1, 2}


def test_same_seed_same_sequence_different_seed_different_sequence():
    logits = np.zeros(100, np.float32)  # uniform: 50 draws collide by chance with p = 1e-100
    a = draw(_core.Sampler(42), logits, 50)
    np.testing.assert_array_equal(draw(_core.Sampler(42), logits, 50), a)
    assert not np.array_equal(draw(_core.Sampler(43), logits, 50), a)
    s = _core.Sampler(1)
    draw(s, logits, 10)
    s.seed(42)  # re-seeding restarts the sequence
    np.testing.assert_array_equal(draw(s, logits, 50), a)


@pytest.mark.parametrize("logits,recent", [
    (np.zeros(0, np.float32), NO_RECENT),
    (np.zeros((2, 4), np.float32), NO_RECENT),
    (np.zeros(4, np.float64), NO_RECENT),
    (np.zeros(4, np.float32), np.array([1], np.int64)),
], ids=["empty", "2-D", "float64", "recent int64"])
def test_bad_input_raises_value_error(logits, recent):
    with pytest.raises(ValueError):
        _core.Sampler(0).sample(logits, 1.0, 0, 1.0, 0.0, 1.1, recent)
