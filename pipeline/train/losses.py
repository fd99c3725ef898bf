"""Distillation losses for offline on-policy distillation: pure functions over tensors.

Losses read the student through gathered per-token quantities (``pipeline.train.head.TokenStats``: log-prob of
the sampled token, log-probs at the teacher's top-k ids, log-mass outside them), never through B x T x V
logits: the trainer computes them chunk by chunk (``pipeline.train.head.fused_head_loss``). ``gather_logprobs`` and
``student_topk_tail_logprobs`` compute them from full logits, the reference path of the tests and benchmarks.

Every loss returns ``(loss, metrics)``: a scalar to back-propagate and a dict of detached tensors
with namespaced keys. ``loss/<name>`` is the returned loss (with a global ``normalizer`` it is this
micro-batch's share of the step loss: sum it over micro-batches); every other key is a statistic of
this call's valid tokens (a mean, or a max for ``*_max``).

Shape key:
    B: sequences in the micro-batch
    T: response positions (logits at position t predict token t)
    V: vocabulary size
    K: teacher top-k entries stored per position
    N: buckets of the restricted distribution, K + 1 with the tail bucket, K without

Normalisation: a loss is a sum over valid tokens (or sequences) divided by ``normalizer``, the
GLOBAL count over all gradient-accumulation micro-batches and ranks of the step (see
``valid_count``). Left as None it is this call's own count, which is right only when one call
makes the whole step (then clamped to at least 1, so a fully masked batch gives 0). A given normaliser is used
as it is, only kept above the dtype's smallest normal number: it may be a sum of weights below 1
(``weight_norm: sum``), and a zero count comes only with a zero sum, which stays 0.
``weights_B_T`` (optional) are per-token weights of that sum: sum_t w_t l_t / normalizer. The
"sequence" normalisation is the weight 1 / (valid tokens of the row) (``reduction_weights``);
a caller that sees only part of each row (a chunk) passes the whole rows' weights.

Masks are 0/1 (bool or float). Values at masked positions are never read: they may hold anything,
padding ids included.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from pipeline.train.head import LOG_ZERO, token_stats

Metrics = dict[str, torch.Tensor]

__all__ = ["LOG_ZERO"]  # re-exported: the floor of the student's tail log-mass (pipeline.train.head)
# Reverse KL reads a teacher bucket with no mass (a stored -inf) as this log-prob (about 1e-13):
# KL(p_S || p_T) is infinite wherever the student puts mass the teacher does not.
REVERSE_KL_TEACHER_FLOOR = -30.0
# PPO importance ratios are exp(log-ratio) with the log-ratio clamped here, so they stay finite.
LOG_RATIO_LIMIT = 20.0


def valid_count(mask_B_T: torch.Tensor, normalization: Literal["token", "sequence"] = "token") -> torch.Tensor:
    """Count of valid tokens, or of sequences with at least one valid token: sum this over the
    micro-batches (and all-reduce over ranks) of one optimiser step to get the ``normalizer``."""
    valid_B_T = mask_B_T.bool()
    if normalization == "token":
        return valid_B_T.sum()
    if normalization == "sequence":
        return valid_B_T.any(-1).sum()
    raise ValueError(f"normalization must be 'token' or 'sequence', got {normalization!r}")


def reduction_weights(mask_B_T: torch.Tensor, normalization: Literal["token", "sequence"] = "token",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token weights of the loss sum: 1 for "token", 1 / (valid tokens in the row) for "sequence"
    (a token-mean within each sequence, summed over sequences); 0 at masked positions."""
    valid_B_T = mask_B_T.bool()
    if normalization == "token":
        return valid_B_T.to(dtype)
    if normalization == "sequence":
        return valid_B_T.to(dtype) / valid_B_T.sum(-1, keepdim=True).clamp_min(1).to(dtype)
    raise ValueError(f"normalization must be 'token' or 'sequence', got {normalization!r}")


def gather_logprobs(logits_B_T_V: torch.Tensor, ids_B_T: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] in float32 (float64 stays float64), from full logits (reference path)."""
    return token_stats(logits_B_T_V, ids_B_T).target_logprobs


def student_topk_tail_logprobs(
    student_logits_B_T_V: torch.Tensor, topk_ids_B_T_K: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's log-probs at the teacher's top-k ids and its log-mass outside them, from full logits
    (reference path; see ``pipeline.train.head.token_stats`` for the formulas). Returns
    ``(topk_logprobs_B_T_K, tail_logprob_B_T)``."""
    stats = token_stats(student_logits_B_T_V, topk_ids_B_T_K[..., 0], topk_ids_B_T_K)
    return stats.topk_logprobs, stats.tail_logprob


# --- top-k distillation losses ------------------------------------------------------------------


def forward_kl_topk(
    student_topk_logprobs_B_T_K: torch.Tensor,
    student_tail_logprob_B_T: torch.Tensor,
    teacher_topk_logprobs_B_T_K: torch.Tensor,
    teacher_tail_logprob_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    tail_bucket: bool = True,
    normalizer: torch.Tensor | float | None = None,
    weights_B_T: torch.Tensor | None = None,
    token_clip: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Forward KL over the teacher's top-k support plus a tail bucket.

        KL(p_T || p_S) = sum_b p_T(b) (log p_T(b) - log p_S(b)),   b in {top-k ids} + {tail}

    Mass-covering distillation (Hinton et al. 2015; GKD, Agarwal et al. 2024, beta = 0), averaged over
    valid tokens. Buckets the teacher gives no mass (stored -inf) contribute 0 (0 log 0 = 0).
    ``tail_bucket=False``: both distributions are renormalised over the K ids and the tail is ignored.

    Args: student_topk_logprobs_B_T_K and student_tail_logprob_B_T (the student's log-probs at the
    teacher's top-k ids and its log-mass outside them, with grad: ``pipeline.train.head.TokenStats``),
    teacher_topk_logprobs_B_T_K, teacher_tail_logprob_B_T (log of the teacher's mass outside the top-k;
    ignored without the tail bucket), mask_B_T, normalizer (global valid-token count), weights_B_T
    (optional per-token weights of the sum), token_clip (c: each token's divergence D_t becomes min(D_t, c), the
    per-token clip of on-policy self-distillation (OPSD, Zhao et al. 2026) as a secondary source describes it;
    a clipped token gets no gradient; None: off).
    """
    return _topk_loss(_forward_kl_B_T, "forward_kl", student_topk_logprobs_B_T_K, student_tail_logprob_B_T,
                      teacher_topk_logprobs_B_T_K, teacher_tail_logprob_B_T, mask_B_T, tail_bucket, normalizer,
                      weights_B_T, token_clip)


def reverse_kl_topk(
    student_topk_logprobs_B_T_K: torch.Tensor,
    student_tail_logprob_B_T: torch.Tensor,
    teacher_topk_logprobs_B_T_K: torch.Tensor,
    teacher_tail_logprob_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    tail_bucket: bool = True,
    normalizer: torch.Tensor | float | None = None,
    weights_B_T: torch.Tensor | None = None,
    token_clip: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Reverse KL over the teacher's top-k support plus a tail bucket.

        KL(p_S || p_T) = sum_b p_S(b) (log p_S(b) - log p_T(b)),   b in {top-k ids} + {tail}

    Mode-seeking; the per-token objective of on-policy distillation (GKD, Agarwal et al. 2024,
    beta = 1; MiniLLM, Gu et al. 2024), here over the stored top-k instead of the full vocabulary.
    Teacher log-probs are floored at ``REVERSE_KL_TEACHER_FLOOR`` (a stored -inf would make it infinite).

    Keep the tail bucket: without it the loss cannot see the mass the student moves outside the
    stored support. ``tail_bucket=False`` renormalises both distributions over the K ids; then any
    amount of student mass outside the top-k costs nothing: on the demo world a student trained that
    way collapsed to 0% accuracy (docs/losses.md). Shapes and arguments as ``forward_kl_topk``.
    """
    return _topk_loss(_reverse_kl_B_T, "reverse_kl", student_topk_logprobs_B_T_K, student_tail_logprob_B_T,
                      teacher_topk_logprobs_B_T_K, teacher_tail_logprob_B_T, mask_B_T, tail_bucket, normalizer,
                      weights_B_T, token_clip)


def jsd_topk(
    student_topk_logprobs_B_T_K: torch.Tensor,
    student_tail_logprob_B_T: torch.Tensor,
    teacher_topk_logprobs_B_T_K: torch.Tensor,
    teacher_tail_logprob_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    beta: float = 0.5,
    tail_bucket: bool = True,
    normalizer: torch.Tensor | float | None = None,
    weights_B_T: torch.Tensor | None = None,
    token_clip: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Generalised Jensen-Shannon divergence over the top-k buckets (GKD, Agarwal et al. 2024, Eq. 1;
    as TRL's ``generalized_jsd_loss``).

        M = beta p_T + (1 - beta) p_S
        JSD_beta = beta KL(p_T || M) + (1 - beta) KL(p_S || M)

    Endpoints follow TRL: beta = 0 is forward KL(p_T || p_S) and beta = 1 is reverse KL(p_S || p_T)
    (the formula itself goes to 0 there; these are the limits of JSD_beta / beta and
    JSD_beta / (1 - beta)). Shapes and arguments as ``forward_kl_topk``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd_topk: beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        per_token = _forward_kl_B_T
    elif beta == 1.0:
        per_token = _reverse_kl_B_T
    else:
        def per_token(student_B_T_N: torch.Tensor, teacher_B_T_N: torch.Tensor) -> torch.Tensor:
            return _jsd_B_T(student_B_T_N, teacher_B_T_N, beta)
    return _topk_loss(per_token, "jsd", student_topk_logprobs_B_T_K, student_tail_logprob_B_T,
                      teacher_topk_logprobs_B_T_K, teacher_tail_logprob_B_T, mask_B_T, tail_bucket, normalizer,
                      weights_B_T, token_clip)


def tvd_topk(
    student_topk_logprobs_B_T_K: torch.Tensor,
    student_tail_logprob_B_T: torch.Tensor,
    teacher_topk_logprobs_B_T_K: torch.Tensor,
    teacher_tail_logprob_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    tail_bucket: bool = True,
    normalizer: torch.Tensor | float | None = None,
    weights_B_T: torch.Tensor | None = None,
    token_clip: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Total variation distance over the top-k buckets: TVD = 1/2 sum_b |p_T(b) - p_S(b)|.

    Bounded in [0, 1], so no bucket can dominate the gradient (used for distillation by Wen et al.
    2023, "f-Divergence Minimization for Sequence-Level Knowledge Distillation"). Shapes and arguments
    as ``forward_kl_topk``.
    """
    return _topk_loss(_tvd_B_T, "tvd", student_topk_logprobs_B_T_K, student_tail_logprob_B_T,
                      teacher_topk_logprobs_B_T_K, teacher_tail_logprob_B_T, mask_B_T, tail_bucket, normalizer,
                      weights_B_T, token_clip)


def akl_topk(
    student_topk_logprobs_B_T_K: torch.Tensor,
    student_tail_logprob_B_T: torch.Tensor,
    teacher_topk_logprobs_B_T_K: torch.Tensor,
    teacher_tail_logprob_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    head_mass: float = 0.5,
    tail_bucket: bool = True,
    normalizer: torch.Tensor | float | None = None,
    weights_B_T: torch.Tensor | None = None,
    token_clip: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Adaptive KL (AKL; Wu et al. 2024, "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for
    Large Language Models", arXiv 2404.02657; as their released ``get_ratio``):

        head = the buckets in the teacher's order up to cumulative teacher mass head_mass (the first always),
        g_h = sum_head |p_T - p_S|,  g_t = sum_rest |p_T - p_S|          (p_S detached)
        AKL = g_h / (g_h + g_t) KL(p_T || p_S) + g_t / (g_h + g_t) KL(p_S || p_T)

    The paper sorts the full vocabulary; here the buckets are the stored top-k (already in descending teacher
    order) and then the tail bucket, which always falls in the rest (its cumulative mass is 1): our adaptation to
    top-k shards. With p_S = p_T both gaps are 0 and so is the loss. The ``akl/head_weight`` metric is the mean
    forward-KL weight. Shapes and arguments as ``forward_kl_topk``.
    """
    if not 0.0 < head_mass < 1.0:
        raise ValueError(f"akl_topk: head_mass must lie in (0, 1), got {head_mass}")
    head_weights: list[torch.Tensor] = []

    def per_token(student_B_T_N: torch.Tensor, teacher_B_T_N: torch.Tensor) -> torch.Tensor:
        p_teacher, p_student = teacher_B_T_N.exp(), student_B_T_N.detach().exp()
        gap_B_T_N = (p_teacher - p_student).abs()
        tail_N = p_teacher.cumsum(-1) > head_mass
        tail_N[..., 0] = False
        g_head = gap_B_T_N.masked_fill(tail_N, 0.0).sum(-1)
        g_tail = gap_B_T_N.masked_fill(~tail_N, 0.0).sum(-1)
        total = (g_head + g_tail).clamp_min(1e-8)
        head_weights.append(g_head / total)
        return (g_head / total) * _forward_kl_B_T(student_B_T_N, teacher_B_T_N) \
            + (g_tail / total) * _reverse_kl_B_T(student_B_T_N, teacher_B_T_N)

    loss, metrics = _topk_loss(per_token, "akl", student_topk_logprobs_B_T_K, student_tail_logprob_B_T,
                               teacher_topk_logprobs_B_T_K, teacher_tail_logprob_B_T, mask_B_T, tail_bucket,
                               normalizer, weights_B_T, token_clip)
    metrics["akl/head_weight"] = _masked_mean(head_weights[0], mask_B_T.bool())
    return loss, metrics


def alpha_topk(
    student_topk_logprobs_B_T_K: torch.Tensor,
    student_tail_logprob_B_T: torch.Tensor,
    teacher_topk_logprobs_B_T_K: torch.Tensor,
    teacher_tail_logprob_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    alpha: float = 0.2,
    tail_bucket: bool = True,
    normalizer: torch.Tensor | float | None = None,
    weights_B_T: torch.Tensor | None = None,
    token_clip: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Amari alpha-divergence over the top-k buckets (the alpha member of DPH-RL's f-divergence family, Li et al.
    2025; its top-k form over stored buckets is our inference):

        D_alpha(p_T || p_S) = (1 - sum_b p_T(b)^alpha p_S(b)^(1 - alpha)) / (alpha (1 - alpha)),   0 < alpha < 1

    alpha -> 1 is forward KL(p_T || p_S), alpha -> 0 reverse KL(p_S || p_T); 0 at p_S = p_T. Shapes and arguments
    as ``forward_kl_topk``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha_topk: alpha must lie in (0, 1), got {alpha}")

    def per_token(student_B_T_N: torch.Tensor, teacher_B_T_N: torch.Tensor) -> torch.Tensor:
        mixed_B_T_N = alpha * teacher_B_T_N + (1.0 - alpha) * student_B_T_N  # -inf teacher buckets give exp = 0
        return (1.0 - mixed_B_T_N.exp().sum(-1)) / (alpha * (1.0 - alpha))

    return _topk_loss(per_token, "alpha_div", student_topk_logprobs_B_T_K, student_tail_logprob_B_T,
                      teacher_topk_logprobs_B_T_K, teacher_tail_logprob_B_T, mask_B_T, tail_bucket, normalizer,
                      weights_B_T, token_clip)


def _forward_kl_B_T(student_B_T_N: torch.Tensor, teacher_B_T_N: torch.Tensor) -> torch.Tensor:
    p_teacher = teacher_B_T_N.exp()
    neg_entropy = torch.where(p_teacher > 0, p_teacher * teacher_B_T_N, 0.0)  # 0 log 0 = 0
    return (neg_entropy - p_teacher * student_B_T_N).sum(-1)


def _reverse_kl_B_T(student_B_T_N: torch.Tensor, teacher_B_T_N: torch.Tensor) -> torch.Tensor:
    teacher_B_T_N = teacher_B_T_N.clamp_min(REVERSE_KL_TEACHER_FLOOR)
    return (student_B_T_N.exp() * (student_B_T_N - teacher_B_T_N)).sum(-1)


def _jsd_B_T(student_B_T_N: torch.Tensor, teacher_B_T_N: torch.Tensor, beta: float) -> torch.Tensor:
    mixture_B_T_N = torch.logaddexp(teacher_B_T_N + math.log(beta), student_B_T_N + math.log(1.0 - beta))
    p_teacher = teacher_B_T_N.exp()
    kl_teacher = torch.where(p_teacher > 0, p_teacher * (teacher_B_T_N - mixture_B_T_N), 0.0).sum(-1)
    kl_student = (student_B_T_N.exp() * (student_B_T_N - mixture_B_T_N)).sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def _tvd_B_T(student_B_T_N: torch.Tensor, teacher_B_T_N: torch.Tensor) -> torch.Tensor:
    return 0.5 * (teacher_B_T_N.exp() - student_B_T_N.exp()).abs().sum(-1)


def _topk_loss(per_token, name, student_topk_B_T_K, student_tail_B_T, teacher_topk_logprobs_B_T_K,
               teacher_tail_logprob_B_T, mask_B_T, tail_bucket, normalizer, weights_B_T, token_clip=None
               ) -> tuple[torch.Tensor, Metrics]:
    """Build the restricted distributions, apply ``per_token`` and reduce over valid tokens. ``token_clip`` = c:
    each token's divergence D_t becomes min(D_t, c) (OPSD's clip; a clipped token has no gradient)."""
    valid_B_T = mask_B_T.bool()
    # Masked positions may hold padding (teacher NaN, student garbage): replace them before anything reads them.
    student_topk_B_T_K = torch.where(valid_B_T.unsqueeze(-1), _upcast(student_topk_B_T_K), 0.0)
    dtype = student_topk_B_T_K.dtype
    student_tail_B_T = torch.where(valid_B_T, student_tail_B_T.to(dtype), 0.0)
    teacher_topk_B_T_K = torch.where(valid_B_T.unsqueeze(-1), teacher_topk_logprobs_B_T_K.to(dtype), 0.0)
    teacher_tail_B_T = torch.where(valid_B_T, teacher_tail_logprob_B_T.to(dtype), 0.0)

    if tail_bucket:
        student_B_T_N = torch.cat([student_topk_B_T_K, student_tail_B_T.unsqueeze(-1)], -1)
        teacher_B_T_N = torch.cat([teacher_topk_B_T_K, teacher_tail_B_T.unsqueeze(-1)], -1)
    else:
        student_B_T_N = student_topk_B_T_K.log_softmax(-1)
        teacher_B_T_N = teacher_topk_B_T_K.log_softmax(-1)

    divergence_B_T = per_token(student_B_T_N, teacher_B_T_N)
    if token_clip is not None:
        clipped_B_T = divergence_B_T.detach() > token_clip
        divergence_B_T = divergence_B_T.clamp_max(token_clip)
    loss = _reduce(divergence_B_T, valid_B_T, "token", normalizer, weights_B_T)
    metrics = {
        f"loss/{name}": loss.detach(),
        "topk/student_tail_mass": _masked_mean(student_tail_B_T.exp(), valid_B_T),
        "topk/teacher_tail_mass": _masked_mean(teacher_tail_B_T.exp(), valid_B_T),
    }
    if token_clip is not None:
        metrics["topk/token_clip_frac"] = _masked_mean(clipped_B_T.to(dtype), valid_B_T)
    return loss, metrics


# --- Lightning OPD: sampled-token policy gradient -----------------------------------------------


def gopd_topk_target(
    teacher_topk_logprobs_N_K: torch.Tensor,
    teacher_tail_logprob_N: torch.Tensor,
    reference_topk_logprobs_N_K: torch.Tensor,
    reference_tail_logprob_N: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """G-OPD / ExOPD's target distribution over the top-k + tail buckets (reward extrapolation, top-k form):

        log q(b) = lam log p_T(b) + (1 - lam) log p_ref(b) - log Z,   Z = sum_b p_T(b)^lam p_ref(b)^(1 - lam)

    over b in {the teacher's top-k ids} + {tail}, p_ref the reference policy's probabilities at the same buckets.
    G-OPD's token reward lam (log p_T - log p_ref) - (log p_theta - log p_ref) is maximised in expectation by
    p_theta = q, so a top-k loss toward q (reverse KL: ``reverse_kl_topk(student, q)``) is its dense, top-k form;
    lam > 1 extrapolates past the teacher (ExOPD), lam = 1 gives q = p_T, and p_ref = p_T makes lam irrelevant.
    The paper states the sampled-token form (``lightning_pg``'s ``reward_scale``); this bucketed form is ours
    **[inf]**. Returns ``(q_topk_N_K, q_tail_N)`` as log-probs in the wider of the inputs' dtypes (float64
    inside); any leading shape works in place of N. Reference log-probs are floored at
    ``REVERSE_KL_TEACHER_FLOOR`` (a reference with no tail mass would make lam > 1 put infinite weight there).
    """
    dtype = torch.promote_types(teacher_topk_logprobs_N_K.dtype, reference_topk_logprobs_N_K.dtype)
    teacher = torch.cat([teacher_topk_logprobs_N_K, teacher_tail_logprob_N.unsqueeze(-1)], -1).double()
    reference = torch.cat([reference_topk_logprobs_N_K, reference_tail_logprob_N.unsqueeze(-1)], -1).double()
    unnormalised = lam * teacher + (1 - lam) * reference.clamp_min(REVERSE_KL_TEACHER_FLOOR)
    q = (unnormalised - unnormalised.logsumexp(-1, keepdim=True)).to(dtype)
    return q[..., :-1], q[..., -1]


def lightning_pg(
    student_logprobs_B_T: torch.Tensor,
    teacher_logprobs_B_T: torch.Tensor,
    behavior_logprobs_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    importance: Literal["none", "truncated", "ppo_clip"] = "none",
    is_cap: float = 2.0,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    advantage_clip: float | None = None,
    normalization: Literal["token", "sequence"] = "sequence",
    normalizer: torch.Tensor | float | None = None,
    weights_B_T: torch.Tensor | None = None,
    reward_scale: float = 1.0,
    k3_guard: float = 0.0,
    ratio_bounds: tuple[float, float] | None = None,
    abs_kl_coef_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """The Lightning OPD loss: policy gradient on the sampled tokens with the per-token reverse-KL reward.

        A_t = sg(log p_T(y_t) - log p_theta(y_t))          (optionally clipped to +-advantage_clip)
        "none"      (reference): l_t = -A_t log p_theta(y_t)
        "truncated":             l_t = -sg(min(r_t, is_cap)) A_t log p_theta(y_t)
        "ppo_clip":              l_t = -min(r_t A_t, clip(r_t, 1 - clip_eps_low, 1 + clip_eps_high) A_t)
        with r_t = p_theta(y_t) / mu(y_t), mu the rollout (behaviour) policy.

    "none" is the public reference implementation of Lightning OPD: a PPO-clip loss whose old policy
    is the current model (ratio 1, clip never binds), i.e. REINFORCE with no importance correction
    toward the rollout policy, no baseline and no advantage normalisation. Its gradient is
    E[(log p_theta - log p_T) grad log p_theta] = grad KL(p_theta || p_T) on the sampled tokens
    (Gu et al. 2024; Agarwal et al. 2024). The importance variants correct for the rollouts having
    come from mu; "ppo_clip" with mu = p_theta has the same gradient as "none" (its loss value is
    -A_t, not -A_t log p_theta). Log-ratios are clamped to +-``LOG_RATIO_LIMIT``.

    normalization: "token" sums l_t over all valid tokens and divides by the valid-token count;
    "sequence" (the reference's) averages l_t within each sequence, sums over sequences and divides
    by the count of sequences with a valid token. ``normalizer`` is the GLOBAL count of the chosen unit.
    ``weights_B_T``: the reduction weights, by default ``reduction_weights(mask_B_T, normalization)``;
    a chunked caller passes those of the whole rows.

    ``reward_scale`` = lambda != 1: G-OPD / ExOPD reward extrapolation (Yang et al. 2026, arXiv 2602.12125: the
    per-token reading of their objective E[lambda log(p_T / pref) - KL(p_theta || pref)], not checked against
    code) with the rollout policy mu as the reference:

        A_t = sg(lambda (log p_T(y_t) - log mu(y_t)) - (log p_theta(y_t) - log mu(y_t)))

    whose optimum is ~ p_T^lambda mu^(1 - lambda): lambda > 1 pushes past the teacher away from mu, lambda < 1
    interpolates toward mu. lambda = 1 is the plain advantage (computed as such, bit for bit). ``k3_guard`` = c
    > 0 adds c * k3_t with k3_t = mu/p_theta - 1 - log(mu/p_theta) (>= 0, zero with zero gradient at
    p_theta = mu), GRPO's k3 estimate of KL(p_theta || mu) with the samples taken as on-policy (our choice of
    guard; the paper names the risk, not this form); reduced like the policy-gradient term.

    ``ratio_bounds`` = (c_lo, c_hi): "ppo_clip" clips r_t to [c_lo, c_hi] instead of [1 - clip_eps_low,
    1 + clip_eps_high] (BAPO's adapted bounds, ``bapo_bounds``). ``abs_kl_coef_B_T`` = k_t adds
    k_t |log p_theta(y_t) - log mu(y_t)| per token (KL-Cov's penalty on the tokens ``covariance_select`` picks).

    Shapes: student_logprobs_B_T (current model, grad), teacher_logprobs_B_T and
    behavior_logprobs_B_T (stored), mask_B_T.
    """
    if importance not in ("none", "truncated", "ppo_clip"):
        raise ValueError(f"lightning_pg: importance must be 'none', 'truncated' or 'ppo_clip', got {importance!r}")
    valid_B_T = mask_B_T.bool()
    logprobs_B_T = torch.where(valid_B_T, _upcast(student_logprobs_B_T), 0.0)
    detached_B_T = logprobs_B_T.detach()
    # Masked positions get advantage 0 and log-ratio 0 whatever their padding holds.
    teacher_B_T = torch.where(valid_B_T, teacher_logprobs_B_T.to(detached_B_T.dtype), detached_B_T)
    behavior_B_T = torch.where(valid_B_T, behavior_logprobs_B_T.to(detached_B_T.dtype), detached_B_T)

    if reward_scale == 1.0:
        raw_advantage_B_T = teacher_B_T - detached_B_T
    else:
        raw_advantage_B_T = reward_scale * (teacher_B_T - behavior_B_T) - (detached_B_T - behavior_B_T)
    advantage_B_T = raw_advantage_B_T
    if advantage_clip is not None:
        advantage_B_T = raw_advantage_B_T.clamp(-advantage_clip, advantage_clip)
    log_ratio_B_T = (logprobs_B_T - behavior_B_T).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio_B_T = log_ratio_B_T.exp()

    if importance == "none":
        per_token_B_T = -advantage_B_T * logprobs_B_T
        clipped_B_T = torch.zeros_like(valid_B_T)
    elif importance == "truncated":
        weight_B_T = ratio_B_T.detach().clamp_max(is_cap)
        per_token_B_T = -weight_B_T * advantage_B_T * logprobs_B_T
        clipped_B_T = ratio_B_T.detach() > is_cap
    else:
        unclipped_B_T = ratio_B_T * advantage_B_T
        low, high = ratio_bounds if ratio_bounds is not None else (1.0 - clip_eps_low, 1.0 + clip_eps_high)
        clipped_term_B_T = ratio_B_T.clamp(low, high) * advantage_B_T
        per_token_B_T = -torch.minimum(unclipped_B_T, clipped_term_B_T)
        clipped_B_T = (clipped_term_B_T < unclipped_B_T).detach()  # the clipped branch wins: no gradient

    if k3_guard:
        k3_B_T = (-log_ratio_B_T).exp() - 1.0 + log_ratio_B_T  # r - 1 - log r with r = mu / p_theta
        per_token_B_T = per_token_B_T + k3_guard * k3_B_T
    if abs_kl_coef_B_T is not None:
        per_token_B_T = per_token_B_T + abs_kl_coef_B_T.to(per_token_B_T.dtype) * log_ratio_B_T.abs()
    loss = _reduce(per_token_B_T, valid_B_T, normalization, normalizer, weights_B_T)
    ratio_detached_B_T = ratio_B_T.detach()
    metrics = {
        "loss/lightning": loss.detach(),
        "lightning/advantage_mean": _masked_mean(advantage_B_T, valid_B_T),
        "lightning/advantage_clip_frac": _masked_mean((advantage_B_T != raw_advantage_B_T).to(detached_B_T.dtype),
                                                      valid_B_T),
        "lightning/reverse_kl_estimate": _masked_mean(-raw_advantage_B_T, valid_B_T),
        "is/ratio_mean": _masked_mean(ratio_detached_B_T, valid_B_T),
        "is/ratio_max": _masked_max(ratio_detached_B_T, valid_B_T),
        "is/clip_frac": _masked_mean(clipped_B_T.to(detached_B_T.dtype), valid_B_T),
    }
    if k3_guard:
        metrics["lightning/k3_guard"] = _masked_mean(k3_B_T, valid_B_T)
    return loss, metrics


def bapo_bounds(ratio_N: torch.Tensor, advantage_N: torch.Tensor, *, low: float = 0.6, low_max: float = 0.8,
                high: float = 1.2, high_max: float = 2.0, step: float = 0.05, target: float = 1.0,
                balance: Literal["clamped", "surviving"] = "clamped", eps: float = 1e-8,
                sum_ranks: bool = True) -> tuple[float, float]:
    """BAPO's adaptive clip range (Xi et al. 2025, "BAPO: Stabilizing Off-Policy Reinforcement Learning for LLMs
    via Balanced Policy Optimization with Adaptive Clipping"; as the authors' released verl recipe,
    ``recipe/bapo/policy_loss.py``, computes it): PPO-clip with bounds [c_lo, c_hi] on the importance ratio r_t.
    Starting from (low, high):

        P = sum_{A_t >= 0} min(r_t, c_hi) A_t,   N = sum_{A_t < 0} max(r_t, c_lo) |A_t|      (balance "clamped")
        while P / (N + eps) < target and c_lo < low_max:   c_lo = min(c_lo + step, low_max)
        while P / (N + eps) < target and c_hi < high_max:  c_hi = min(c_hi + step, high_max)

    each token contributing its clipped surrogate value (every token of the call counted; N = 0 is balanced), P and
    N recomputed after each move and summed over the ranks when torch.distributed runs with more than one
    (``sum_ranks``; every rank then takes the same bounds, as the released code's all-reduce makes them; all ranks
    must call this equally often). The released code runs once per policy-loss call, i.e. per micro-batch and
    reduced over the data-parallel ranks: so does the trainer. Under "clamped" a raised c_lo adds to N (a token
    below it contributes c_lo |A_t|), so c_lo climbs to low_max whenever the start is unbalanced, and only c_hi
    restores the balance: the released behaviour, kept as is.

    ``balance="surviving"`` is lopd's earlier rule, from a secondary restatement: only the tokens whose gradient
    survives the clip count, P = sum_{A>0, r<=c_hi} r A and N = sum_{A<0, r>=c_lo} r |A|, so raising c_lo drops
    negative tokens. Differences kept from the released loss: no dual clip (its clip_ratio_c = 3 for A < 0) in
    ``lightning_pg``. step = 0 fixes the bounds. Shapes: ratio_N, advantage_N over the tokens at hand (detached).
    Returns (c_lo, c_hi)."""
    if balance not in ("clamped", "surviving"):
        raise ValueError(f"bapo_bounds: balance must be 'clamped' or 'surviving', got {balance!r}")
    ratio_N, advantage_N = ratio_N.detach().double(), advantage_N.detach().double()
    distributed = (sum_ranks and torch.distributed.is_available() and torch.distributed.is_initialized()
                   and torch.distributed.get_world_size() > 1)

    def balanced(lo: float, hi: float) -> bool:
        if balance == "clamped":
            effective_N = torch.where(advantage_N >= 0, ratio_N.clamp_max(hi), ratio_N.clamp_min(lo)) * advantage_N
            sums = torch.stack([effective_N.clamp_min(0).sum(), (-effective_N).clamp_min(0).sum()])
        else:
            pos = torch.where((advantage_N > 0) & (ratio_N <= hi), ratio_N * advantage_N, 0.0).sum()
            neg = torch.where((advantage_N < 0) & (ratio_N >= lo), -ratio_N * advantage_N, 0.0).sum()
            sums = torch.stack([pos, neg])
        if distributed:
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
        pos, neg = float(sums[0]), float(sums[1])
        return neg <= 0 or pos / (neg + eps) >= target

    if step > 0:
        done = balanced(low, high)
        while not done and low < low_max:
            low = min(low + step, low_max)
            done = balanced(low, high)
        while not done and high < high_max:
            high = min(high + step, high_max)
            done = balanced(low, high)
    return low, high


def covariance_select(student_logprobs_N: torch.Tensor, advantage_N: torch.Tensor, *, mode: str,
                      frac: float = 2e-4, cov_low: float = 1.0, cov_high: float = 5.0,
                      eligible_N: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens the entropy-mechanism methods act on (Cui et al. 2025, "The Entropy Mechanism of Reinforcement
    Learning for Reasoning Language Models"; as the authors' code, PRIME-RL/Entropy-Mechanism-of-RL, and verl's
    ``compute_policy_loss_clip_cov`` / ``compute_policy_loss_kl_cov`` compute them):

        Cov_t = (log p_theta(y_t) - mean log p_theta) (A_t - mean A)          (detached, over the tokens at hand)
        n = max(1, int(frac N))                                               (N > 0 tokens; none when N = 0)
        clip_cov: n tokens drawn at random (all of them if fewer) among the ``eligible_N`` ones with
                  cov_low < Cov_t < cov_high: their policy-gradient term loses its gradient
        kl_cov:   the top n by Cov_t: they get the penalty |log p_theta - log mu|

    ``eligible_N`` (clip_cov only; default every token): the released Clip-Cov excludes the tokens whose PPO clip
    is already active (its ``clip_by_origin``); the caller passes the others when its loss is PPO-clipped. High-
    covariance tokens (confident and rewarded, or unlikely and penalised) drive the entropy collapse. Clip-Cov draws
    from torch's default generator (saved in checkpoints). Shapes: ``[N]``; returns (selected_N bool, cov_N)."""
    lp_N, adv_N = student_logprobs_N.detach().double(), advantage_N.detach().double()
    cov_N = (lp_N - lp_N.mean()) * (adv_N - adv_N.mean())
    n = max(1, int(frac * cov_N.numel()))
    selected_N = torch.zeros_like(cov_N, dtype=torch.bool)
    if cov_N.numel() == 0:
        return selected_N, cov_N
    if mode == "kl_cov":
        return selected_N.index_fill_(0, torch.topk(cov_N, min(n, cov_N.numel())).indices, True), cov_N
    if mode != "clip_cov":
        raise ValueError(f"covariance_select: mode must be 'clip_cov' or 'kl_cov', got {mode!r}")
    in_range_N = (cov_N > cov_low) & (cov_N < cov_high)
    if eligible_N is not None:
        in_range_N &= eligible_N.bool()
    candidates = torch.nonzero(in_range_N).squeeze(-1)
    chosen = candidates[torch.randperm(candidates.numel())[:n].to(candidates.device)]
    return selected_N.index_fill_(0, chosen, True), cov_N


# --- KDRL: group-relative reward + distillation on failed rollouts -----------------------------------------------


def kdrl(
    student_logprobs_B_T: torch.Tensor,
    teacher_logprobs_B_T: torch.Tensor,
    behavior_logprobs_B_T: torch.Tensor,
    advantage_B_T: torch.Tensor,
    failed_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    beta: float = 5e-3,
    is_cap: float = 2.0,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    normalizer: torch.Tensor | float | None = None,
    weights_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """KDRL: GRPO on the verifiable reward plus distillation on the failed rollouts (Xu et al. 2025, "KDRL:
    Post-Training Reasoning LLMs via Unified Knowledge Distillation and Reinforcement Learning", as a secondary
    source restates it; not checked against code). Offline, the old policy is the rollout policy mu:

        r_t = p_theta(y_t) / mu(y_t),   Ahat_i = (R_i - mean_g R) / (std_g R + eps)   (fixed, the prompt statistics)
        l_t = -min(r_t Ahat_i, clip(r_t, 1 - clip_eps_low, 1 + clip_eps_high) Ahat_i)
              + beta m_i sg(min(r_t, is_cap)) 1/2 (log p_theta(y_t) - log p_T(y_t))^2,     m_i = [R_i <= 0]

    beta = 0 is GRPO (PPO-clip, token mean); equal rewards in a group give Ahat = 0 and leave the distillation
    term alone. std_g is the sample standard deviation of the group's rewards (n - 1 in the denominator: torch.std
    as GRPO's advantage in verl's ``compute_grpo_outcome_advantage`` and TRL's GRPOTrainer), eps = 1e-6 (verl's),
    both from ``storage.prompt_stats``. The paper anneals beta from 5e-3 to 1e-3 (a ``loss_schedule`` can).
    Log-ratios are clamped to +-``LOG_RATIO_LIMIT``. Shapes: student_logprobs_B_T (grad), teacher_logprobs_B_T,
    behavior_logprobs_B_T, advantage_B_T (each token's rollout's Ahat), failed_B_T (bool), mask_B_T.
    """
    valid_B_T = mask_B_T.bool()
    logprobs_B_T = torch.where(valid_B_T, _upcast(student_logprobs_B_T), 0.0)
    dtype = logprobs_B_T.dtype
    detached_B_T = logprobs_B_T.detach()
    teacher_B_T = torch.where(valid_B_T, teacher_logprobs_B_T.to(dtype), detached_B_T)
    behavior_B_T = torch.where(valid_B_T, behavior_logprobs_B_T.to(dtype), detached_B_T)
    advantage_B_T = torch.where(valid_B_T, advantage_B_T.to(dtype), 0.0)
    ratio_B_T = (logprobs_B_T - behavior_B_T).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT).exp()
    unclipped_B_T = ratio_B_T * advantage_B_T
    clipped_term_B_T = ratio_B_T.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantage_B_T
    pg_B_T = -torch.minimum(unclipped_B_T, clipped_term_B_T)
    failed_B_T = failed_B_T.bool() & valid_B_T
    distill_B_T = ratio_B_T.detach().clamp_max(is_cap) * 0.5 * (logprobs_B_T - teacher_B_T).square()
    per_token_B_T = pg_B_T + beta * torch.where(failed_B_T, distill_B_T, 0.0) if beta else pg_B_T
    loss = _reduce(per_token_B_T, valid_B_T, "token", normalizer, weights_B_T)
    return loss, {"loss/kdrl": loss.detach(),
                  "kdrl/advantage_mean": _masked_mean(advantage_B_T, valid_B_T),
                  "kdrl/failed_frac": _masked_mean(failed_B_T.to(dtype), valid_B_T),
                  "kdrl/distill": _masked_mean(torch.where(failed_B_T, distill_B_T, 0.0), valid_B_T),
                  "kdrl/clip_frac": _masked_mean((clipped_term_B_T < unclipped_B_T).to(dtype), valid_B_T)}


# --- DPH-RL anchors to the rollout policy -------------------------------------------------------


def anchor_divergence(
    student_logprobs_B_T: torch.Tensor,
    behavior_logprobs_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    generator: Literal["forward_kl", "js", "alpha"],
    alpha: float = 0.2,
    normalizer: torch.Tensor | float | None = None,
    weights_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """An f-divergence anchor to the rollout policy mu on its own samples (DPH-RL, Li et al. 2025, "The
    Choice of Divergence: A Neglected Key to Mitigating Diversity Collapse in Reinforcement Learning with
    Verifiable Reward", arXiv 2509.07430: mass-covering divergences to the initial policy on the prompts it
    already solves, computed with generator functions on its samples; the generators below are the standard
    ones of each divergence, not checked against the authors' code here). With u_t = p_theta(y_t) / mu(y_t):

        forward_kl  f(u) = u - log u - 1                       (k3: E_mu[f] = KL(mu || p_theta))
        js          f(u) = u log u - (u + 1) log((u + 1) / 2)
        alpha       f(u) = (u^(1 - alpha) - (1 - alpha) u - alpha) / (alpha (alpha - 1))

    l_t = f(u_t), reduced over valid tokens like the other losses (the trainer routes it to the prompts mu
    already solves). Every generator is 0 with zero gradient at p_theta = mu. The log-ratio is clamped to
    +-``LOG_RATIO_LIMIT``. Shapes: student_logprobs_B_T (grad), behavior_logprobs_B_T (stored), mask_B_T.
    """
    if generator not in ("forward_kl", "js", "alpha"):
        raise ValueError(f"anchor_divergence: generator must be 'forward_kl', 'js' or 'alpha', got {generator!r}")
    if generator == "alpha" and not 0.0 < alpha < 1.0:
        raise ValueError(f"anchor_divergence: alpha must lie in (0, 1), got {alpha}")
    valid_B_T = mask_B_T.bool()
    logprobs_B_T = torch.where(valid_B_T, _upcast(student_logprobs_B_T), 0.0)
    behavior_B_T = torch.where(valid_B_T, behavior_logprobs_B_T.to(logprobs_B_T.dtype), logprobs_B_T.detach())
    log_u_B_T = (logprobs_B_T - behavior_B_T).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    u_B_T = log_u_B_T.exp()
    if generator == "forward_kl":
        per_token_B_T = u_B_T - log_u_B_T - 1.0
    elif generator == "js":
        per_token_B_T = u_B_T * log_u_B_T - (u_B_T + 1.0) * (torch.logaddexp(log_u_B_T, torch.zeros_like(log_u_B_T))
                                                           - math.log(2.0))
    else:
        per_token_B_T = ((log_u_B_T * (1.0 - alpha)).exp() - (1.0 - alpha) * u_B_T - alpha) / (alpha * (alpha - 1.0))
    loss = _reduce(per_token_B_T, valid_B_T, "token", normalizer, weights_B_T)
    return loss, {f"loss/anchor_{generator}": loss.detach(),
                  f"anchor/{generator}_ratio_mean": _masked_mean(u_B_T, valid_B_T)}


# --- SFT and combination ------------------------------------------------------------------------


def sft_cross_entropy(
    student_logprobs_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    normalizer: torch.Tensor | float | None = None,
    weights_B_T: torch.Tensor | None = None,
    correct_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Next-token negative log-likelihood: -sum_t log p_theta(y_t) / normalizer.

    The SFT stage's loss and the optional SFT term of OPD training. ``student_logprobs_B_T`` is
    ``TokenStats.target_logprobs`` (log-prob of each target token, with grad); ``correct_B_T`` (optional,
    the student's argmax equals the target) adds the ``sft/accuracy`` metric.
    """
    valid_B_T = mask_B_T.bool()
    logprobs_B_T = torch.where(valid_B_T, _upcast(student_logprobs_B_T), 0.0)
    loss = _reduce(-logprobs_B_T, valid_B_T, "token", normalizer, weights_B_T)
    metrics = {"loss/sft": loss.detach()}
    if correct_B_T is not None:
        metrics["sft/accuracy"] = _masked_mean(correct_B_T.to(logprobs_B_T.dtype), valid_B_T)
    return loss, metrics


def combined_loss(
    terms: dict[str, tuple[torch.Tensor, Metrics]], weights: dict[str, float]
) -> tuple[torch.Tensor, Metrics]:
    """total = sum_name weights[name] * loss[name]; metrics of all terms merged, plus ``loss/total``.

    ``terms`` maps a loss name to what its function returned; ``weights`` must have the same names.
    """
    if not terms or terms.keys() != weights.keys():
        raise ValueError(f"combined_loss: terms {sorted(terms)} and weights {sorted(weights)} must name "
                         "the same, non-empty set of losses")
    total = sum(weights[name] * loss for name, (loss, _) in terms.items())
    metrics: Metrics = {}
    for name, (_, term_metrics) in terms.items():
        repeated = metrics.keys() & term_metrics.keys()
        if repeated:
            raise ValueError(f"combined_loss: term {name!r} repeats metric keys {sorted(repeated)}")
        metrics.update(term_metrics)
    metrics["loss/total"] = total.detach()
    return total, metrics


# --- helpers ------------------------------------------------------------------------------------


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32; fp32 and fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _reduce(per_token_B_T: torch.Tensor, valid_B_T: torch.Tensor, normalization: str,
            normalizer: torch.Tensor | float | None, weights_B_T: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t w_t l_t over valid tokens / normalizer, with w = ``reduction_weights(valid, normalization)``
    unless given (token: a plain sum; sequence: a token-mean per row, summed over rows)."""
    if normalizer is None:
        normalizer = valid_count(valid_B_T, normalization).clamp_min(1)
    # not clamped at 1: a weight sum may be below it (``weight_norm: sum``); counts arrive clamped by their callers
    normalizer = torch.as_tensor(normalizer, dtype=per_token_B_T.dtype, device=per_token_B_T.device).clamp_min(
        torch.finfo(per_token_B_T.dtype).tiny)
    if weights_B_T is None:
        weights_B_T = reduction_weights(valid_B_T, normalization, per_token_B_T.dtype)
    per_token_B_T = torch.where(valid_B_T, per_token_B_T * weights_B_T.to(per_token_B_T.dtype), 0.0)
    return per_token_B_T.sum() / normalizer


def _masked_mean(x_B_T: torch.Tensor, valid_B_T: torch.Tensor) -> torch.Tensor:
    x_B_T = x_B_T.detach()
    return torch.where(valid_B_T, x_B_T, 0.0).sum() / valid_B_T.sum().clamp_min(1)


def _masked_max(x_B_T: torch.Tensor, valid_B_T: torch.Tensor) -> torch.Tensor:
    """The largest valid value, 0 where there is none (an empty chunk, a fully masked micro-batch)."""
    x_B_T = torch.where(valid_B_T, x_B_T.detach(), 0.0)
    return x_B_T.max() if x_B_T.numel() else x_B_T.new_zeros(())
