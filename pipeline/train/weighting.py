"""Sample and token weights and row routing for offline OPD: pure functions over tensors.

The losses (``pipeline.train.losses``) reduce ``sum_t w_t l_t / normalizer`` over valid tokens; the functions here
make the ``w_t`` of the weighting methods and the row masks of the per-term routing. They read only what the
shards and their prompt statistics (``storage.prompt_stats``) hold, never the student, so the trainer computes
them once per micro-batch, before the chunked LM head; TIP's token selection alone reads the student (its
entropy and divergence, from a no-grad pre-pass of the head, ``pipeline.train.head.HeadPrepass``). docs/methods.md
lists each method with its source.

Shape key:
    B: rollouts (rows) of the micro-batch
    T: response positions
    R: rollouts of the whole shard set (the prompt statistics table)
    N: the selected (valid) tokens of a micro-batch, flattened
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from storage.errors import LopdUserError


def paced_kernel(pass_rate_B: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """PACED's pass-rate kernel (a Beta(alpha + 1, beta + 1) density up to a constant):

        w_g = p_g^alpha (1 - p_g)^beta

    with p_g the pass rate of the rollout's prompt. Offline, p_g is the rollout policy's pass rate, fixed for
    the run (the paper recomputes it under the current student: an inference of ours that the fixed rate is
    the offline analogue). alpha = beta = 1 (the paper's) puts the most weight on prompts solved half the time
    and none on prompts always or never solved; alpha = beta = 0 gives 1 everywhere (0^0 = 1). Normalise it
    over the step with ``mean_one``.
    """
    return pass_rate_B.pow(alpha) * (1.0 - pass_rate_B).pow(beta)


def mean_one(weights_B: torch.Tensor, total_weight: torch.Tensor, total_rows: torch.Tensor) -> torch.Tensor:
    """``weights_B * total_rows / total_weight``: weights whose mean over the step's rows is 1 (the totals are
    the step's global sums, so every micro-batch and rank scales alike). All-zero weights stay 0."""
    scale = torch.where(total_weight > 0, total_rows / total_weight.clamp_min(torch.finfo(total_weight.dtype).tiny),
                        0.0)
    return weights_B * scale.to(weights_B.dtype)


def position_weights(gap_B_T: torch.Tensor, mask_B_T: torch.Tensor, gamma: float) -> torch.Tensor:
    """Position weights of IW-OPD (TRL's implementation of CORD's position idea):

        S = sum_t |ahat_t|,   P_t = sum_{s < t} |ahat_s|,   w_t = 1 + gamma (1 - P_t / S)

    over the valid tokens of each row, with ``gap_B_T`` = ahat = log p_T(y_t) - log mu(y_t) (fixed offline).
    Early tokens, before most of the row's teacher-student gap, weigh up to 1 + gamma; the weights fall to 1
    as the gap accumulates. A row with no gap (S = 0) weighs 1 + gamma throughout. gamma = 0 gives 1 exactly.
    Returns ``w_B_T`` (1 at masked positions).
    """
    valid_B_T = mask_B_T.bool()
    abs_B_T = torch.where(valid_B_T, gap_B_T.abs(), 0.0)
    total_B_1 = abs_B_T.sum(-1, keepdim=True)
    before_B_T = abs_B_T.cumsum(-1) - abs_B_T  # exclusive prefix sum
    frac_B_T = torch.where(total_B_1 > 0, before_B_T / total_B_1.clamp_min(torch.finfo(abs_B_T.dtype).tiny), 0.0)
    return torch.where(valid_B_T, 1.0 + gamma * (1.0 - frac_B_T), 1.0)


def scope_weights(group_R: torch.Tensor, correct_R: torch.Tensor, teacher_mean_R: torch.Tensor,
                  behavior_mean_R: torch.Tensor, tau: float = 1.0, student_ppl_sign: int = -1) -> torch.Tensor:
    """SCOPE's per-rollout weights (Zheng et al. 2026, "SCOPE: Signal-Calibrated On-Policy Distillation Enhancement
    with Dual-Path Adaptive Weighting", arXiv 2604.10688), within each prompt's incorrect and correct rollouts:

        incorrect i:  w_i = |I_g| softmax_{j in I_g}(mean_t lT_j / tau)           (teacher perplexity)
        correct i:    w_i = |C_g| softmax_{j in C_g}(sign * mean_t lmu_j / tau)    (rollout-policy perplexity)

    with lT the teacher's and lmu the rollout policy's log-prob of the sampled tokens, averaged over the rollout
    (the prompt statistics). Each subset's weights average 1; equal means (or tau -> inf) give 1 everywhere.
    sign = -1 (the paper) favours correct rollouts the rollout policy was least sure of; the released script
    uses +1. The trainer routes the distillation terms to incorrect rollouts and ``sft`` (MLE) to correct ones.

    Shapes: group_R (int prompt index), correct_R (bool), teacher_mean_R, behavior_mean_R; returns w_R.
    """
    score_R = torch.where(correct_R, student_ppl_sign * behavior_mean_R, teacher_mean_R) / tau
    subset_R = 2 * group_R + correct_R.long()
    n = int(subset_R.max()) + 1 if len(subset_R) else 0
    peak = torch.full((n,), -torch.inf, dtype=score_R.dtype).scatter_reduce(0, subset_R, score_R, "amax")
    exp_R = (score_R - peak[subset_R]).exp()
    total = torch.zeros(n, dtype=score_R.dtype).index_add_(0, subset_R, exp_R)
    count = torch.zeros(n, dtype=score_R.dtype).index_add_(0, subset_R, torch.ones_like(score_R))
    return count[subset_R] * exp_R / total[subset_R]


def _tip_entropy_scale(entropy_N: torch.Tensor, quantile: float) -> torch.Tensor:
    """TIP's normalised entropy h in [0, 1]: Hc = min(H, q_quantile(H)), h = (Hc - min Hc) / (max Hc - min Hc);
    0 everywhere when Hc is constant. The cap keeps a few very uncertain tokens from squashing the rest."""
    capped_N = entropy_N.clamp_max(torch.quantile(entropy_N, quantile))
    return _min_max(capped_N)


def _min_max(x_N: torch.Tensor) -> torch.Tensor:
    """(x - min x) / (max x - min x) over the tokens at hand; 0 everywhere when x is constant."""
    span = x_N.max() - x_N.min()
    return torch.where(span > 0, (x_N - x_N.min()) / span.clamp_min(torch.finfo(span.dtype).tiny), 0.0)


def tip_soft_or_scores(entropy_N: torch.Tensor, divergence_N: torch.Tensor, quantile: float = 0.98) -> torch.Tensor:
    """TIP's soft-OR importance of each token (Xu et al. 2026, "TIP: Token Importance in On-Policy Distillation",
    arXiv 2604.14084: informative tokens are the uncertain ones (high student entropy) OR the overconfident-and-wrong
    ones (low entropy, high teacher-student divergence); the score as a secondary source restates it, not checked
    against code, which releases only the entropy mode):

        h = minmax(min(H, q_quantile(H))),   d = minmax(D),   score = 1 - (1 - h)(1 - d) = h + (1 - h) d

    over the tokens at hand, with H the student's full-vocabulary entropy and D its divergence from the teacher at
    the token. The second form reads as a probabilistic OR of two disjoint events: "uncertain" (h) or "confident
    (1 - h) and wrong (d)". The most uncertain token scores 1 whatever its divergence, as does the most divergent
    one; only a confident token that agrees with the teacher scores near 0. Constant entropy gives score d,
    constant divergence score h. Shapes: ``[N]``. ``tip_q3_only_scores`` is the confident-and-wrong region alone."""
    h_N = _tip_entropy_scale(entropy_N, quantile)
    return 1.0 - (1.0 - h_N) * (1.0 - _min_max(divergence_N))


def tip_q3_only_scores(entropy_N: torch.Tensor, divergence_N: torch.Tensor, quantile: float = 0.98) -> torch.Tensor:
    """TIP's "Q3-only" rule (arXiv 2604.14084: the low-entropy, high-divergence quadrant alone; on DeepPlanning,
    training on 20% of the tokens chosen so surpassed full-token OPD), as a score:

        h = minmax(min(H, q_quantile(H))),   score = (1 - h) D

    A confident (low-entropy) token far from the teacher scores highest; an uncertain one, or one that agrees with
    the teacher, lowest: the most uncertain token scores 0. Constant entropy gives h = 0 (the score is D). The
    product form is a secondary source's restatement of the rule [2nd]. Shapes: ``[N]``."""
    return (1.0 - _tip_entropy_scale(entropy_N, quantile)) * divergence_N


def tip_entropy_probs(entropy_N: torch.Tensor, divergence_N: torch.Tensor, vocab_size: int, alpha: float,
                      gamma: float) -> torch.Tensor:
    """TIP's entropy-mode sampling weights (as in the authors' code):

        p_t ~ (H_t / ln V)^alpha (D_t / ln 2)^gamma

    with D the Jensen-Shannon divergence to the teacher (bounded by ln 2); gamma = 0 samples by entropy alone.
    Returns unnormalised weights ``[N]``."""
    return (entropy_N / math.log(vocab_size)).clamp_min(0).pow(alpha) * (divergence_N / math.log(2.0)).clamp_min(
        0).pow(gamma)


def tip_kept_count(n_tokens: int, rho: float) -> int:
    """Tokens TIP keeps of ``n_tokens``: ceil(rho n), at least 1 when there is any."""
    return min(n_tokens, math.ceil(rho * n_tokens))


def tip_keep(score_N: torch.Tensor, rho: float, sample: bool) -> torch.Tensor:
    """The kept tokens, ``[N]`` bool: the top ``tip_kept_count`` by score, or (``sample``) as many drawn without
    replacement with probability proportional to the score (torch's default generator, whose state checkpoints
    hold). rho = 1 keeps every token whatever the scores."""
    n = score_N.numel()
    keep = tip_kept_count(n, rho)
    kept_N = torch.zeros(n, dtype=torch.bool, device=score_N.device)
    if keep == n:
        return kept_N.fill_(True)
    if sample:
        p_N = score_N.detach().double().cpu()
        p_N = (p_N / p_N.max() if p_N.max() > 0 else torch.ones_like(p_N)).clamp_min(1e-12)  # every token drawable
        index = torch.multinomial(p_N, keep, replacement=False).to(score_N.device)
    else:
        index = torch.topk(score_N.detach(), keep).indices
    return kept_N.index_fill_(0, index, True)


def route_mask(route: str, reward: torch.Tensor, pass_rate: torch.Tensor | None) -> torch.Tensor:
    """Which rows (or tokens, any shape) a loss term trains on:

        all: every row;  correct: reward > 0;  incorrect: reward <= 0;
        solved: the prompt's pass rate is 1;  unsolved: the pass rate is below 1.

    A null reward (NaN) routes to neither side; the trainer refuses such shards before any routing.
    """
    if route == "all":
        return torch.ones_like(reward, dtype=torch.bool)
    if route == "correct":
        return reward > 0
    if route == "incorrect":
        return reward <= 0
    if pass_rate is None:
        raise ValueError(f"route {route!r} needs the prompts' pass rates (prompt statistics)")
    if route == "solved":
        return pass_rate >= 1
    if route == "unsolved":
        return pass_rate < 1
    raise ValueError(f"route must be all, correct, incorrect, solved or unsolved, got {route!r}")


def source_key(label: str, prompt_id: str) -> str:
    """A rollout's prompt id as a run over several shard sets sees it: the set's label first, so prompt statistics
    of different sets never mix (``RolloutTable.merge``; the mixed source tags its records so)."""
    return f"{label}/{prompt_id}"


GROUP_ADVANTAGE_EPS = 1e-6  # GRPO's guard (verl's epsilon) for a group whose rewards are all equal (std 0: Ahat 0)


@dataclass
class RolloutTable:
    """The prompt statistics of a shard set indexed by rollout ``(prompt_id, sample_index)``."""

    index: dict[tuple[str, int], int]
    reward_R: np.ndarray
    pass_rate_R: np.ndarray
    row_weight_R: np.ndarray | None = None  # fixed per-rollout weights (SCOPE), None when no method sets them
    # group-normalised rewards (r - mean_g r) / (std_g r + 1e-6), std_g the sample std as GRPO's (KDRL)
    advantage_R: np.ndarray | None = None

    @classmethod
    def from_table(cls, table: pa.Table, scope: tuple[float, int] | None = None) -> "RolloutTable":
        """``scope`` = (tau, student_ppl_sign) adds SCOPE's per-rollout weights (``scope_weights``)."""
        prompt_ids = table["prompt_id"].to_pylist()
        keys = zip(prompt_ids, table["sample_index"].to_pylist())
        reward_R = table["reward"].to_numpy().astype(np.float32)
        row_weight_R = None
        if scope is not None:
            _, group_R = np.unique(np.asarray(prompt_ids, dtype=str), return_inverse=True)
            row_weight_R = scope_weights(
                torch.from_numpy(group_R), torch.from_numpy(reward_R > 0),
                torch.from_numpy(table["teacher_mean"].to_numpy().astype(np.float64)),
                torch.from_numpy(table["behavior_mean"].to_numpy().astype(np.float64)), *scope).float().numpy()
        mean_R = table["reward_mean"].to_numpy().astype(np.float64)
        std_R = table["reward_std"].to_numpy().astype(np.float64)
        advantage_R = ((reward_R - mean_R) / (std_R + GROUP_ADVANTAGE_EPS)).astype(np.float32)
        return cls({key: i for i, key in enumerate(keys)}, reward_R, table["pass_rate"].to_numpy().astype(np.float32),
                   row_weight_R, advantage_R)

    @classmethod
    def merge(cls, tables: dict[str, "RolloutTable"]) -> "RolloutTable":
        """Several shard sets' statistics as one table: each set's rows keyed ``(source_key(label, prompt_id),
        sample_index)``, so two sets may reuse prompt ids. Each set's groups stay its own (its pass rates, SCOPE
        weights and group advantages were computed within it)."""
        index: dict[tuple[str, int], int] = {}
        offset = 0
        for label, t in tables.items():
            index.update({(source_key(label, p), j): offset + i for (p, j), i in t.index.items()})
            offset += len(t.reward_R)

        def cat(name: str) -> np.ndarray | None:
            parts = [getattr(t, name) for t in tables.values()]
            return None if any(p is None for p in parts) else np.concatenate(parts)

        return cls(index, cat("reward_R"), cat("pass_rate_R"), cat("row_weight_R"), cat("advantage_R"))

    def rows(self, keys: Sequence[tuple[str, int]]) -> np.ndarray:
        """Table rows of these rollouts; a rollout the statistics do not hold is an error (stale statistics)."""
        try:
            return np.fromiter((self.index[k] for k in keys), dtype=np.int64, count=len(keys))
        except KeyError as e:
            raise LopdUserError(f"rollout prompt_id={e.args[0][0]!r} sample_index={e.args[0][1]} is not in the "
                                "shard set's prompt statistics; delete prompt_stats.parquet beside the shards "
                                "to recompute them") from None
