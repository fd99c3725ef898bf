"""`TeacherRecord`: the numpy record that crosses extraction stage -> codec -> trainer.

Shape key: L = prompt + response tokens, R = response tokens (L - prompt_len), K = top-k size.
Position t of the response arrays scores token ``token_ids[prompt_len + t]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Mass outside the top-k is clamped at 1e-30 (log = -69.08): below that float32 rounding of the
# top-k sum makes `1 - sum` meaningless, and a loss bucket that small carries no signal.
TAIL_LOGPROB_FLOOR = float(np.log(1e-30))


@dataclass
class TeacherRecord:
    """One scored rollout (see docs/architecture.md)."""

    prompt_id: str
    sample_index: int
    token_ids: np.ndarray  # int32 [L]  prompt + response, exactly as sampled
    prompt_len: int
    teacher_logprobs: np.ndarray  # float32 [R]  teacher log p(y_t), exact
    behavior_logprobs: np.ndarray  # float32 [R]  rollout policy log p(y_t), exact
    topk_ids: np.ndarray  # int32 [R, K]  teacher top-k ids, descending log-prob
    topk_logprobs: np.ndarray  # float32 [R, K]
    tail_logprob: np.ndarray  # float32 [R]  log(1 - sum(exp(topk_logprobs))), floor TAIL_LOGPROB_FLOOR
    reward: float | None = None

    @property
    def num_response_tokens(self) -> int:
        return int(self.token_ids.shape[0]) - int(self.prompt_len)

    @property
    def response_ids(self) -> np.ndarray:
        """int32 [R]: the sampled tokens the response arrays score."""
        return self.token_ids[self.prompt_len :]

    def check(self, k: int | None = None, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the record and the field when shapes or ranges are inconsistent."""
        where = f"record prompt_id={self.prompt_id!r} sample_index={self.sample_index}"
        length = self.token_ids.shape[0]
        if self.token_ids.ndim != 1 or not 0 <= self.prompt_len <= length:
            raise ValueError(f"{where}: token_ids must be 1-D with 0 <= prompt_len ({self.prompt_len}) <= {length}")
        r = length - self.prompt_len
        for name in ("teacher_logprobs", "behavior_logprobs", "tail_logprob"):
            if getattr(self, name).shape != (r,):
                raise ValueError(f"{where}: {name} has shape {getattr(self, name).shape}, expected ({r},) "
                                 "(R = len(token_ids) - prompt_len)")
        for name in ("topk_ids", "topk_logprobs"):
            shape = getattr(self, name).shape
            if len(shape) != 2 or shape[0] != r or (k is not None and shape[1] != k):
                raise ValueError(f"{where}: {name} has shape {shape}, expected ({r}, {k if k is not None else 'K'})")
        if self.topk_ids.shape != self.topk_logprobs.shape:
            raise ValueError(f"{where}: topk_ids {self.topk_ids.shape} and topk_logprobs {self.topk_logprobs.shape} "
                             "differ")
        if vocab_size is not None and self.topk_ids.size:
            lo, hi = int(self.topk_ids.min()), int(self.topk_ids.max())
            if lo < 0 or hi >= vocab_size:
                raise ValueError(f"{where}: topk_ids span [{lo}, {hi}], outside the vocabulary [0, {vocab_size})")


def compute_tail_logprob(topk_logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum_k exp(topk_logprobs)) per position, float32 [R] from [R, K].

    Computed as log(-expm1(logsumexp)) in float64, which keeps relative precision when the top-k
    holds almost all the mass (1 - sum near 0); clamped at TAIL_LOGPROB_FLOOR (also when rounding
    makes the top-k sum reach 1).
    """
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    if lp.shape[-1] == 0:
        return np.zeros(lp.shape[:-1], dtype=np.float32)
    peak = lp.max(axis=-1, keepdims=True)
    log_sum = (peak + np.log(np.exp(lp - peak).sum(axis=-1, keepdims=True)))[..., 0]
    outside = -np.expm1(np.minimum(log_sum, 0.0))
    return np.maximum(np.log(np.maximum(outside, 1e-300)), TAIL_LOGPROB_FLOOR).astype(np.float32)
