"""The demo world's verifiable task: multi-digit addition with a short step-by-step solution.

Prompt ``123+459=``; a style-"A" solution writes one step per digit from the least significant,
``x+y+carry=s`` joined by ``,``, then ``|`` and the final answer: ``3+9+0=12,2+5+1=8,1+4+0=5|582``.
Style "B" (used for the inconsistent-teacher ablation) writes ``carry+y+x=s`` joined by ``;``.
Both styles end with the same ``|answer`` line, so one checker grades both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ALPHABET = "0123456789+=,;|"
STYLES = ("A", "B")


@dataclass(frozen=True)
class Problem:
    id: str
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


def solution(a: int, b: int, digits: int, style: str = "A") -> str:
    """Ground-truth step-by-step solution (the text after the prompt, without EOS)."""
    steps, carry = [], 0
    for i in range(digits):
        x, y = (a // 10**i) % 10, (b // 10**i) % 10
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}" if style == "A" else f"{carry}+{y}+{x}={s}")
        carry = s // 10
    sep = "," if style == "A" else ";"
    return sep.join(steps) + f"|{a + b}"


def extract_answer(response: str) -> str | None:
    """The final answer: the digits after the last ``|``; None when there is none."""
    if "|" not in response:
        return None
    tail = response.rsplit("|", 1)[1].strip()
    return tail if tail.isdigit() else None


def is_correct(response: str, answer: str) -> bool:
    """Exact-match checker on the final answer line."""
    got = extract_answer(response)
    return got is not None and answer.isdigit() and int(got) == int(answer)


def make_problems(n: int, digits: int, seed: int, exclude: set[tuple[int, int]] | None = None,
                  prefix: str = "p") -> list[Problem]:
    """n distinct random problems with operands of exactly ``digits`` digits, none in ``exclude``."""
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    seen = set(exclude or ())
    out: list[Problem] = []
    while len(out) < n:
        pair = (rng.randint(lo, hi), rng.randint(lo, hi))
        if pair in seen:
            continue
        seen.add(pair)
        out.append(Problem(f"{prefix}{len(out):06d}", *pair))
    return out
