"""Answer checkers: grade a response against a reference answer (1.0 correct, 0.0 wrong)."""

from __future__ import annotations

from typing import Callable

from pipeline.tasks import arithmetic
from storage.errors import LopdUserError

Checker = Callable[[str, str], bool]


def math_verify_check(response: str, answer: str) -> bool:
    """Real-data math checking through HF's math-verify (LaTeX/boxed answers, symbolic equality)."""
    from math_verify import parse, verify

    gold = parse(answer if "$" in answer or "\\boxed" in answer else f"${answer}$")
    return bool(verify(gold, parse(response)))


CHECKERS: dict[str, Checker] = {
    "arithmetic": arithmetic.is_correct,
    "math": math_verify_check,
}


def get_checker(name: str) -> Checker:
    if name not in CHECKERS:
        raise LopdUserError(f"unknown checker {name!r}; set the config's checker to one of {sorted(CHECKERS)}")
    return CHECKERS[name]
