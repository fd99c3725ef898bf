"""The demo world's verifiable task: multi-digit addition with a short step-by-step solution.

Prompt ``123+459=``; a style-"A" solution writes one step per digit from the least significant,
``x+y+carry=s`` joined by ``,``, then ``|`` and the final answer: ``3+9+0=12,2+5+1=8,1+4+0=5|582``.
Style "B" (used for the inconsistent-teacher ablation) writes ``carry+y+x=s`` joined by ``;``.
Both styles end with the same ``|answer`` line, so one checker grades both.

Two worlds (``FORMATS``) share the steps:
- ``steps``: the steps, then ``|answer`` (above).
- ``guess``: "guess, then check": a direct guess of the result first (hard for a small model: every digit
  needs the carries below it), then ``|``, the steps and ``|answer``: ``582|3+9+0=12,2+5+1=8,1+4+0=5|582``. A
  teacher trained with some wrong guesses (``wrong_guess``; no loss on them) takes the final answer from the steps;
  its own samples almost always have final = guess, so a student that learns only from them may copy the guess.
  ``parse`` splits a response into guess, steps and final; ``steps_answer`` reads the answer the steps imply.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ALPHABET = "0123456789+=,;|"
STYLES = ("A", "B")
FORMATS = ("steps", "guess")


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


def solution(a: int, b: int, digits: int, style: str = "A", format: str = "steps", guess: int | None = None) -> str:
    """Ground-truth solution (the text after the prompt, without EOS). ``format="guess"`` puts a guess of the
    result first: ``guess`` when given (a wrong guess for the teacher's training), else the right answer."""
    if format == "guess":
        return f"{a + b if guess is None else guess}|" + solution(a, b, digits, style)
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


def wrong_guess(answer: int, rng: random.Random) -> int:
    """A wrong guess near ``answer``, of the kinds a small model makes: one digit changed (a carry missed or
    added, or any other digit) in 2 of 3 draws, else +-1 to +-3 at one digit's place."""
    text = str(answer)
    while True:
        i = rng.randrange(len(text))
        if rng.random() < 2 / 3:
            digit = rng.choice([d for d in "0123456789" if d != text[i] and (i or d != "0" or len(text) == 1)])
            guess = int(text[:i] + digit + text[i + 1:])
        else:
            guess = answer + rng.choice([-3, -2, -1, 1, 2, 3]) * 10 ** (len(text) - 1 - i)
        if guess != answer and guess >= 0:
            return guess


def parse(response: str) -> tuple[str | None, str, str | None]:
    """``(guess, steps, final)`` of a guess-world response: the digits before the first ``|`` (None when the
    response does not start with digits then ``|``), the text between, the final answer (``extract_answer``)."""
    head, sep, rest = response.partition("|")
    if not sep or not head.isdigit():
        return None, response.rsplit("|", 1)[0], extract_answer(response)
    return head, rest.rsplit("|", 1)[0] if "|" in rest else rest, extract_answer(response)


def steps_answer(steps: str) -> str | None:
    """The answer a response's steps imply, least significant step first: the last digit of each step's sum,
    then the last step's carry (``3+9+0=12,2+5+1=8,1+4+0=5`` -> ``582``); None when a step has no sum. Either
    separator (``,`` or ``;``) is read."""
    sums = [step.rsplit("=", 1)[1] if "=" in step else "" for step in steps.replace(";", ",").split(",")]
    if not sums or not all(s.isdigit() for s in sums):
        return None
    digits = "".join(s[-1] for s in reversed(sums))
    return str(int(sums[-1][:-1] + digits if len(sums[-1]) > 1 else digits))


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
