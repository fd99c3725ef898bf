"""The configs of the optional offline-OPD methods (``train.methods``; docs/methods.md), and ``Strict``, the base of
every lopd config: unknown fields are errors. ``pipeline.config`` builds its configs on ``Strict`` and
``MethodsConfig`` from here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.hub import ModelPath


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PacedConfig(Strict):
    """PACED pass-rate kernel (docs/methods.md): each rollout's tokens are weighted by
    w_g = p_g^alpha (1 - p_g)^beta of its prompt's pass rate p_g under the rollout policy, normalised to mean 1
    over the rows of the step. Neutral: alpha = beta = 0."""

    alpha: float = Field(1.0, ge=0, description="exponent of the pass rate (paper: 1)")
    beta: float = Field(1.0, ge=0, description="exponent of the failure rate (paper: 1)")


class PositionConfig(Strict):
    """Position weighting, the IW-OPD form of CORD's idea: w_t = 1 + gamma (1 - P_t / S), P_t the sum of
    |log p_T - log mu| before t in the row, S over the whole row. The weights multiply every loss term; the paper
    (and TRL's IW-OPD) weighs the sampled-token loss, ``lightning`` with a token mean. Neutral: gamma = 0."""

    gamma: float = Field(0.5, ge=0, description="extra weight of the first token (weights lie in [1, 1 + gamma])")


class GopdConfig(Strict):
    """G-OPD / ExOPD reward extrapolation. ``lightning``: reference = the rollout policy mu,
    A_t = lam (log p_T - log mu) - (log p_theta - log mu). The top-k losses: their target becomes
    q ~ p_T^lam p_ref^(1 - lam) over the teacher's top-k + tail buckets, p_ref a frozen reference model's
    log-probs at those ids (one more no-grad forward per micro-batch). Neutral: lam = 1 and k3_guard = 0."""

    lam: float = Field(1.25, gt=0, description="reward scale lambda; > 1 extrapolates past the teacher (ExOPD)")
    k3_guard: float = Field(0.0, ge=0, description="coefficient of a k3 estimate of KL(p_theta || mu) on the "
                            "sampled tokens added to the loss (0 = off)")
    reference: ModelPath | None = Field(
        None, description="top-k losses: model dir of the frozen reference policy p_ref; null = train.student "
        "(the rollout policy mu when training starts from the SFT student that sampled the shards). Loaded "
        "only when lam != 1 and a top-k loss is on")


class ScopeConfig(Strict):
    """SCOPE correctness routing: the distillation terms train on incorrect rollouts weighted by the teacher's
    confidence in them, ``sft`` on correct ones weighted by the rollout policy's; see docs/methods.md. Its
    routes apply to the terms ``train.rows`` leaves unset. Neutral: off (null)."""

    tau: float = Field(1.0, gt=0, description="softmax temperature of the per-prompt weights (inf: uniform)")
    student_ppl_sign: Literal[-1, 1] = Field(
        -1, description="-1 (the paper): favour correct rollouts the rollout policy was least sure of; "
        "+1 (the released script): the most sure")


class OpsdConfig(Strict):
    """OPSD's per-token clip for self-distillation shards (docs/methods.md): each top-k distillation term's
    per-token divergence D_t becomes min(D_t, clip), so a few pivot tokens cannot dominate the gradient (a
    clipped token gets none). From a secondary source; no published default. Neutral: off (null)."""

    clip: float = Field(gt=0, description="the cap c of min(D_t, c) on each token's divergence (required)")


class TipConfig(Strict):
    """TIP token selection (docs/methods.md): each micro-batch keeps a fraction rho of its tokens, chosen from
    the student's entropy and its divergence from the teacher (a no-grad pre-pass over the LM head's chunks), and
    the kept tokens weigh 1 / (the step's kept fraction). Neutral: rho = 1."""

    mode: Literal["entropy", "soft_or", "q3_only"] = Field(
        "entropy", description="entropy: sample ceil(rho N) tokens with probability ~ (H / ln V)^alpha "
        "(D / ln 2)^gamma (the released code's mode); soft_or: keep the top ceil(rho N) by 1 - (1 - h)(1 - d), "
        "uncertain OR confident-and-wrong, h the min-max normalised entropy capped at its 98th percentile, d the "
        "min-max normalised divergence (a secondary source); q3_only: the top ceil(rho N) by (1 - h) D, the "
        "paper's low-entropy, high-divergence quadrant alone")
    rho: float = Field(0.5, gt=0, le=1, description="fraction of each micro-batch's tokens kept (paper: 0.5 for "
                       "entropy, 0.1-0.2 for soft_or and q3_only)")
    alpha: float = Field(1.0, ge=0, description="entropy mode: exponent of the normalised entropy")
    gamma: float = Field(0.0, ge=0, description="entropy mode: exponent of the normalised divergence (0: entropy "
                         "only)")


class BapoConfig(Strict):
    """BAPO adaptive clipping of ``lightning``'s PPO-clip form (docs/methods.md): the ratio bounds [c_lo, c_hi]
    start at (low, high) and rise by ``step`` (c_lo up to low_max first, then c_hi up to high_max) while the
    positive-advantage tokens' contribution is below ``target`` times the negative ones', the contributions summed
    over the micro-batch's tokens and all ranks (the authors' released code). Needs
    train.lightning.importance=ppo_clip. Neutral: step = 0 with low = 1 - clip_eps_low and high = 1 + clip_eps_high
    (plain PPO-clip)."""

    low: float = Field(0.6, gt=0, le=1, description="starting lower bound c_lo (released config: 0.6)")
    low_max: float = Field(0.8, gt=0, le=1, description="c_lo is raised up to this (released config: 0.8)")
    high: float = Field(1.2, ge=1, description="starting upper bound c_hi (released config: 1.2)")
    high_max: float = Field(2.0, ge=1, description="c_hi is raised up to this (released config: 2.0)")
    step: float = Field(0.05, ge=0, description="increment of a bound (released config: 0.05); 0 keeps the bounds "
                        "fixed")
    target: float = Field(1.0, gt=0, description="wanted ratio of positive to negative contributions (released "
                          "config: 1)")
    balance: Literal["clamped", "surviving"] = Field(
        "clamped", description="what a token contributes: clamped (the released code): its clipped surrogate "
        "value, min(r, c_hi) A for A >= 0 and max(r, c_lo) |A| for A < 0, every token counted; surviving (lopd's "
        "earlier rule, from a secondary restatement): r |A| of the tokens whose gradient survives the clip only")


class CovConfig(Strict):
    """Clip-Cov / KL-Cov for ``lightning`` (docs/methods.md): the tokens with the highest covariance between the
    student's log-prob and the advantage lose their gradient (clip_cov: max(1, int(frac N)) drawn at random among
    cov_low < Cov < cov_high, tokens PPO-clip already clips excluded) or get a |log p_theta - log mu| penalty
    (kl_cov: the top max(1, int(frac N)) by Cov), the counts of the authors' (and verl's) code. Neutral: kl_cov with
    kl_coef = 0, or clip_cov with an empty range (cov_low >= cov_high)."""

    mode: Literal["clip_cov", "kl_cov"] = Field("clip_cov", description="drop the gradient, or add the penalty")
    frac: float = Field(2e-4, gt=0, le=1, description="share of the tokens selected: max(1, int(frac N))")
    cov_low: float = Field(1.0, description="clip_cov: lower covariance bound of the candidates")
    cov_high: float = Field(5.0, description="clip_cov: upper covariance bound of the candidates")
    kl_coef: float = Field(1.0, ge=0, description="kl_cov: coefficient of |log p_theta - log mu|")


class MethodsConfig(Strict):
    """Optional weighting and reward methods of offline OPD; each is off (null) by default. Setting a field,
    e.g. ``--set train.methods.paced.alpha=1``, turns the method on with its paper's defaults for the rest."""

    paced: PacedConfig | None = None
    position: PositionConfig | None = None
    gopd: GopdConfig | None = None
    scope: ScopeConfig | None = None
    opsd: OpsdConfig | None = None
    tip: TipConfig | None = None
    bapo: BapoConfig | None = None
    cov: CovConfig | None = None

    def needs_rewards(self) -> bool:
        return self.paced is not None or self.scope is not None
