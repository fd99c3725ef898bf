"""The engine interface: sample from a model and score fixed sequences with it.

Two real implementations: ``HFEngine`` (transformers; batched, KV-cached generation and chunked scoring)
and ``VLLMEngine`` (vLLM's offline ``LLM`` API, the production engine). ``make_engine`` (in
``pipeline.engines``) builds the configured one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.config import SamplingConfig


@dataclass
class Generation:
    """One sampled answer. ``logprobs[t]`` is the log-prob of ``response_ids[t]`` under the distribution
    it was sampled from (temperature and top-p applied): the behaviour policy for importance correction."""

    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS sampled) or "length"


@dataclass
class ScoredSequence:
    """Teacher feedback for positions ``start .. len(sequence)-1`` of one sequence (R positions)."""

    token_logprobs: np.ndarray  # float32 [R]  log p(actual token)
    topk_ids: np.ndarray  # int32 [R, K]  descending log-prob
    topk_logprobs: np.ndarray  # float32 [R, K]
    tail_logprob: np.ndarray  # float32 [R]  log of the mass outside the top-k


class Engine(Protocol):
    """Samples and scores; a context manager whose exit (also on an error) calls ``close``."""

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        """``sampling.n`` generations per prompt, in prompt order."""

    def score(self, sequences: list[list[int]], starts: list[int], k: int) -> list[ScoredSequence]:
        """Untempered (temperature 1) log-probs of each sequence's tokens from ``start`` on, with the top-k."""

    def close(self) -> None:
        """Free the model and stop any worker processes; idempotent."""

    def __enter__(self) -> Engine: ...

    def __exit__(self, *exc: object) -> None: ...


def token_batches(lengths: Sequence[int], budget: int, *, max_items: int | None = None,
                  padded: bool = False) -> list[slice]:
    """Contiguous slices of items (in order) holding at most ``budget`` tokens each, counted as the sum of
    ``lengths`` or, ``padded``, as items x the longest (a padded batch); at most ``max_items`` items. An item
    longer than the budget goes alone. Scoring in these sub-batches bounds an engine's memory per call."""
    out, start, total, longest = [], 0, 0, 0
    for i, n in enumerate(lengths):
        grown_longest = max(longest, n)
        grown = (i - start + 1) * grown_longest if padded else total + n
        full = max_items is not None and i - start >= max_items
        if i > start and (grown > budget or full):
            out.append(slice(start, i))
            start, total, grown_longest = i, 0, n
        total += n
        longest = grown_longest
    if start < len(lengths):
        out.append(slice(start, len(lengths)))
    return out


def model_vocab_size(model_dir: str | Path, tokenizer_size: int) -> int:
    """The vocabulary a teacher's top-k ids live in: the model's output size (``vocab_size`` of its config,
    the rows of its lm head), not ``len(tokenizer)``. Checkpoints pad the output layer (Qwen3: 151,936 rows
    for 151,669 tokens) and a padded row can reach the top-k. A tokenizer larger than the model is an error:
    some of its ids would have no logit."""
    from transformers import AutoConfig

    vocab = int(AutoConfig.from_pretrained(str(model_dir)).get_text_config().vocab_size)
    if tokenizer_size > vocab:
        raise ValueError(f"{model_dir}: the tokenizer has {tokenizer_size} tokens but the model's output layer only "
                         f"{vocab} rows (config vocab_size); ids >= {vocab} would have no logit. The model and "
                         "tokenizer do not belong together.")
    return vocab


# Re-exported for older imports; new code imports it from pipeline.engines.
from pipeline.engines import make_engine  # noqa: E402,F401
