"""The guess world's diagnostic: does a model take its final answer from its steps or copy its guess?

In the guess format (``pipeline/tasks/arithmetic.py``) a response is ``guess|steps|final``. The teacher's own
samples almost always have final = guess, so a student that learns only from them can pass by copying its
guess; the answer the steps imply is right far more often than a small model's guess. Where a model's guess is
wrong, its final answer shows which it learned: ``copies_wrong_guess`` (final = the wrong guess) against
``reads_steps`` (final = what its steps imply). The demo reports these for the SFT student's rollouts (the
states OPD learns from) and for every row's greedy answers on the test problems.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import EngineConfig, SamplingConfig
from pipeline.engines.hf import HFEngine
from pipeline.models import encode_prompt, load_tokenizer
from pipeline.prompts import PromptRecord
from pipeline.tasks import arithmetic
from storage.shardset import ShardSet


def guess_stats(responses: list[str], answers: list[str]) -> dict[str, Any]:
    """Counts and rates over ``responses`` (decoded answers, no special tokens) against the right ``answers``:
    ``guess_wrong`` (a response whose guess is missing or not the answer), ``accuracy``, ``accuracy_guess_wrong``
    / ``accuracy_guess_right`` (accuracy among those), ``copies_wrong_guess`` and ``reads_steps`` (among the
    wrong guesses: final = the guess; final = what the steps imply), ``steps_right`` (the steps imply the answer).
    A rate over no responses is None."""
    n = wrong = correct = correct_wrong = copies = reads = steps_right = 0
    for response, answer in zip(responses, answers, strict=True):
        guess, steps, final = arithmetic.parse(response)
        implied = arithmetic.steps_answer(steps)
        ok = arithmetic.is_correct(response, answer)
        n += 1
        correct += ok
        steps_right += implied == answer
        if guess != answer:
            wrong += 1
            correct_wrong += ok
            copies += final is not None and final == guess
            reads += final is not None and final == implied

    def rate(num: int, den: int) -> float | None:
        return round(num / den, 4) if den else None

    return {"responses": n, "guess_wrong": rate(wrong, n), "accuracy": rate(correct, n),
            "accuracy_guess_wrong": rate(correct_wrong, wrong),
            "accuracy_guess_right": rate(correct - correct_wrong, n - wrong),
            "copies_wrong_guess": rate(copies, wrong), "reads_steps": rate(reads, wrong),
            "steps_right": rate(steps_right, n), "counts": {"guess_wrong": wrong, "correct_guess_wrong": correct_wrong}}


def greedy_guess_stats(model_dir: Path, prompts: list[PromptRecord], max_new_tokens: int) -> dict[str, Any]:
    """``guess_stats`` of a model's greedy answers to ``prompts``."""
    tokenizer = load_tokenizer(model_dir)
    engine = HFEngine(str(model_dir), EngineConfig(batch_size=512))
    gens = engine.generate([encode_prompt(tokenizer, p.prompt) for p in prompts],
                           SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens))
    engine.close()
    responses = [tokenizer.decode(g[0].response_ids, skip_special_tokens=True) for g in gens]
    return guess_stats(responses, [p.answer or "" for p in prompts])


def rollout_guess_stats(rollouts: Path, prompts: list[PromptRecord], tokenizer: Any) -> dict[str, Any]:
    """``guess_stats`` of the stored rollouts (every sample of every prompt) against their prompts' answers."""
    answers = {p.id: p.answer or "" for p in prompts}
    shards = ShardSet.open(rollouts)
    responses, truth = [], []
    for i in shards.complete_indices():
        table = shards.read_shard(i, columns=["prompt_id", "token_ids", "prompt_len"])
        for pid, ids, plen in zip(*(table.column(c).to_pylist() for c in ("prompt_id", "token_ids", "prompt_len"))):
            responses.append(tokenizer.decode(ids[plen:], skip_special_tokens=True))
            truth.append(answers[pid])
    return guess_stats(responses, truth)
