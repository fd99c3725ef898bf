"""Accuracy over n sampled answers per problem, as papers report it: pass@k, avg@n and maj@k.

For one problem with n samples of which c are correct:

- avg@n = c / n, the mean accuracy of one sample (equal to pass@1);
- pass@k, k <= n: the probability that at least one of k samples drawn without replacement from the n is correct,
  the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1):
  pass@k = 1 - C(n - c, k) / C(n, k), computed as their numerically stable product
  1 - prod_{i = n - c + 1}^{n} (1 - k / i);
- maj@k, k <= n: the expected score of a majority vote over k samples drawn without replacement from the n. The
  vote is over extracted final answers: the correct samples vote for the reference answer, each wrong sample for its
  own extracted answer, and a sample with no extractable answer casts no vote. A vote the correct answer wins alone
  scores 1, one it ties with t - 1 other answers scores 1 / t, any other 0. Computed exactly, by counting the
  k-subsets in which the correct answer gets x votes and every other answer at most x.

A benchmark's score is the mean over its problems.
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction
from typing import Hashable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` of ``n`` samples correct (Chen et al. 2021): 1 - C(n-c,k)/C(n,k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def maj_at_k(votes: Sequence[Hashable | None], correct: Sequence[bool], k: int) -> float:
    """Expected majority-vote score over the k-subsets of one problem's n samples (module docstring).

    ``votes[i]``: sample i's extracted answer (None: no answer found); ``correct[i]``: whether the checker
    accepted it. Correct samples count as one answer whatever their text."""
    n = len(votes)
    if len(correct) != n or not 1 <= k <= n:
        raise ValueError(f"maj@k needs one vote per sample and 1 <= k <= n, got {len(correct)} / {n} samples, k={k}")
    c = sum(map(bool, correct))
    others = list(Counter(v for v, ok in zip(votes, correct) if not ok and v is not None).values())
    silent = n - c - sum(others)
    total = Fraction(0)
    for x in range(1, min(c, k) + 1):
        # ways[(r, t)]: subsets of r samples from the wrong answers seen so far with each at most x votes, t of
        # them at exactly x (a tie with the correct answer)
        ways: dict[tuple[int, int], int] = {(0, 0): 1}
        for size in others:
            grown: dict[tuple[int, int], int] = {}
            for (r, t), count in ways.items():
                for y in range(min(size, x, k - x - r) + 1):
                    key = (r + y, t + (y == x))
                    grown[key] = grown.get(key, 0) + count * math.comb(size, y)
            ways = grown
        won = sum(Fraction(count * math.comb(silent, k - x - r), t + 1) for (r, t), count in ways.items())
        total += math.comb(c, x) * won
    return float(total / math.comb(n, k))


def default_ks(n: int) -> list[int]:
    """The k of pass@k / maj@k reported for n samples: 1, 2, 4, ... below n, and n."""
    return sorted({2**i for i in range(n.bit_length()) if 2**i < n} | {n})


def summarise(correct: list[list[bool]], votes: list[list[Hashable | None]], ks: Sequence[int]) -> dict[str, float]:
    """avg@n, pass@k and maj@k (each k in ``ks``) over problems: each the mean of its per-problem value. Every
    problem has the same number n of samples."""
    n = len(correct[0])
    if any(len(c) != n for c in correct):
        raise ValueError("every problem needs the same number of samples")
    problems = len(correct)
    out = {f"avg@{n}": sum(map(sum, correct)) / (n * problems)}
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(c), k) for c in correct) / problems
    for k in ks:
        out[f"maj@{k}"] = sum(maj_at_k(v, c, k) for v, c in zip(votes, correct)) / problems
    return out
