"""pipeline/eval_metrics.py: pass@k, avg@n and maj@k against hand-computed cases, the closed form and brute force
over every k-subset."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from fractions import Fraction

import pytest

from pipeline.eval_metrics import default_ks, maj_at_k, pass_at_k, summarise


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (4, 1, 2, 0.5),         # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 3, 0.9),         # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (10, 3, 1, 0.3),        # pass@1 = c / n
    (10, 0, 5, 0.0),
    (10, 10, 1, 1.0),
    (6, 2, 5, 1.0),         # n - c < k: every 5-subset holds a correct sample
    (8, 1, 8, 1.0),         # k = n: "any of n"
    (6, 2, 2, 1 - 6 / 15),  # 1 - C(4,2)/C(6,2)
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_the_closed_form_and_subset_enumeration():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(closed), abs=1e-12), (n, c, k)
    samples = [True] * 3 + [False] * 4
    subsets = list(itertools.combinations(samples, 3))
    assert pass_at_k(7, 3, 3) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_pass_at_k_refuses_k_above_n():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def _brute_maj(votes, correct, k) -> Fraction:
    """Mean vote score over every k-subset: 1 / (answers tied at the top) when the correct answer is among them."""
    total, subsets = Fraction(0), list(itertools.combinations(range(len(votes)), k))
    for subset in subsets:
        tally = Counter("<correct>" if correct[i] else votes[i] for i in subset
                        if correct[i] or votes[i] is not None)
        if tally.get("<correct>", 0) and tally["<correct>"] == max(tally.values()):
            total += Fraction(1, sum(v == tally["<correct>"] for v in tally.values()))
    return total / len(subsets)


def test_maj_at_k_hand_computed():
    # answers A (correct), B, B: maj@1 = 1/3; maj@2: {A,B} twice a tie (1/2), {B,B} lost: (1/2 + 1/2 + 0) / 3
    votes, correct = ["7", "8", "8"], [True, False, False]
    assert maj_at_k(votes, correct, 1) == pytest.approx(1 / 3)
    assert maj_at_k(votes, correct, 2) == pytest.approx(1 / 3)
    assert maj_at_k(votes, correct, 3) == 0.0
    # A, A, B, C: the correct answer wins every full vote; maj@1 is the accuracy
    votes, correct = ["7", "7", "8", "9"], [True, True, False, False]
    assert maj_at_k(votes, correct, 4) == 1.0 and maj_at_k(votes, correct, 1) == 0.5
    # samples with no answer cast no vote: A, -, - wins every vote it takes part in
    assert maj_at_k(["7", None, None], [True, False, False], 3) == 1.0
    assert maj_at_k(["7", None, None], [True, False, False], 2) == pytest.approx(2 / 3)
    # correct answers written differently still vote together
    assert maj_at_k(["7", "7.0", "8", "8"], [True, True, False, False], 4) == 0.5


def test_maj_at_k_equals_brute_force_over_subsets():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        correct = [rng.random() < 0.4 for _ in range(n)]
        votes = [None if rng.random() < 0.2 else rng.choice("abc") for _ in range(n)]
        for k in range(1, n + 1):
            assert maj_at_k(votes, correct, k) == pytest.approx(float(_brute_maj(votes, correct, k)), abs=1e-12), (
                votes, correct, k)


def test_summarise_averages_over_problems_and_default_ks():
    assert default_ks(1) == [1] and default_ks(4) == [1, 2, 4] and default_ks(6) == [1, 2, 4, 6]
    correct = [[True, False, False, False], [True, True, True, True]]
    votes = [["5", "6", "6", None], ["9"] * 4]
    out = summarise(correct, votes, [1, 2, 4])
    assert out["avg@4"] == pytest.approx(5 / 8) and out["pass@1"] == pytest.approx(5 / 8)
    assert out["pass@2"] == pytest.approx((0.5 + 1) / 2) and out["pass@4"] == 1.0
    assert out["maj@4"] == pytest.approx(0.5)  # problem 1: "6" wins 2 to 1
    assert out["maj@1"] == pytest.approx(5 / 8)
