"""Token-selection pre-passes of the chunked head: TIP, BAPO's clip bounds, Clip-Cov / KL-Cov. Each gathers
per-token statistics without gradient before the loss pass and sets what the loss reads."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from pipeline.config import TrainConfig
from pipeline.methods_config import TipConfig
from pipeline.train import losses as L
from pipeline.train.batching import TokenTargets
from pipeline.train.head import Metrics, TokenStats
from pipeline.train.weighting import tip_entropy_probs, tip_keep, tip_q3_only_scores, tip_soft_or_scores


class Prepasses:
    """The methods' ``HeadPrepass``es in one pass over the head's chunks (TIP, BAPO, Clip-Cov / KL-Cov). When one
    of them (TIP) keeps a subset of the tokens, ``targets`` is cut to those rows, in the order the loss pass
    will see them."""

    def __init__(self, parts: list[Any], targets: TokenTargets):
        self.parts, self.targets = parts, targets
        self.entropy = any(p.entropy for p in parts)
        # Clip-Cov leaves out the tokens whose PPO clip is active, at BAPO's adapted bounds when BAPO is on
        bapo = next((p for p in parts if isinstance(p, BapoBounds)), None)
        for p in parts:
            if isinstance(p, CovSelection) and bapo is not None:
                if parts.index(bapo) > parts.index(p):
                    raise ValueError("Prepasses: BAPO's pre-pass must come before Clip-Cov's, which reads its bounds")
                p.bapo = bapo

    def chunk(self, stats: TokenStats, start: int, end: int) -> None:
        for p in self.parts:
            p.chunk(stats, start, end)

    def done(self) -> torch.Tensor | None:
        kept = [index for p in self.parts if (index := p.done()) is not None]
        if not kept:
            return None
        (keep_n,) = kept  # only TIP selects
        for f in fields(self.targets):
            if (value := getattr(self.targets, f.name)) is not None:
                setattr(self.targets, f.name, value[keep_n])
        return keep_n


class BapoBounds:
    """BAPO's clip range of a micro-batch as the chunked head's no-grad pre-pass: it gathers every token's
    importance ratio r_t = p_theta / mu and ``lightning``'s advantage A_t (as ``lightning_pg`` computes it, G-OPD
    and ``advantage_clip`` included), then ``done`` adapts [c_lo, c_hi] (``pipeline.train.losses.bapo_bounds``)
    before the loss pass. Per micro-batch, the contributions summed over the ranks: as the authors' released code
    (its policy loss runs per micro-batch, all-reduced over the data-parallel ranks); every rank runs the same number
    of micro-batches per step, an idle copy (no target token) adding zero to the sums. The bounds therefore depend
    on how the step is grouped (docs/methods.md, "Statistics global to the step"). Cost: one more chunk x vocab
    matmul per token, no gradient."""

    entropy = False

    def __init__(self, cfg: TrainConfig, targets: TokenTargets):
        self.cfg, self.targets = cfg, targets
        n = targets.teacher_logprobs_N.shape[0]
        self.student_N = torch.zeros(n, dtype=torch.float64, device=targets.teacher_logprobs_N.device)
        self.bounds: tuple[float, float] | None = None
        self.stats: Metrics = {}

    def chunk(self, stats: TokenStats, start: int, end: int) -> None:
        self.student_N[start:end] = stats.target_logprobs

    def done(self) -> None:
        b, behavior_N = self.cfg.methods.bapo, self.targets.behavior_logprobs_N.double()
        advantage_N = lightning_advantage(self.cfg, self.targets, self.student_N)
        ratio_N = (self.student_N - behavior_N).clamp(-L.LOG_RATIO_LIMIT, L.LOG_RATIO_LIMIT).exp()
        self.bounds = L.bapo_bounds(ratio_N, advantage_N, low=b.low, low_max=b.low_max, high=b.high,
                                    high_max=b.high_max, step=b.step, target=b.target, balance=b.balance)
        self.stats = {"bapo/clip_low": torch.tensor(self.bounds[0]), "bapo/clip_high": torch.tensor(self.bounds[1])}


def lightning_advantage(cfg: TrainConfig, targets: TokenTargets, student_N: torch.Tensor) -> torch.Tensor:
    """``lightning``'s per-token advantage as ``lightning_pg`` computes it (G-OPD's lambda and ``advantage_clip``
    included), from the student's log-probs of a pre-pass (float64, no gradient)."""
    teacher_N, behavior_N = targets.teacher_logprobs_N.double(), targets.behavior_logprobs_N.double()
    lam = 1.0 if cfg.methods.gopd is None else cfg.methods.gopd.lam
    advantage_N = (teacher_N - student_N if lam == 1.0
                   else lam * (teacher_N - behavior_N) - (student_N - behavior_N))
    clip = cfg.lightning.advantage_clip
    return advantage_N if clip is None else advantage_N.clamp(-clip, clip)


class CovSelection:
    """Clip-Cov / KL-Cov as the chunked head's no-grad pre-pass: the student's log-prob of every token of the
    micro-batch, then ``covariance_select`` with ``lightning``'s advantage picks the tokens, and ``targets`` gets
    ``pg_keep_N`` (Clip-Cov: 0 on them) or ``pg_kl_coef_N`` (KL-Cov: kl_coef on them) for the lightning term.
    With ``lightning.importance: ppo_clip``, Clip-Cov draws only among the tokens whose PPO clip is not active (the
    released code's ``clip_by_origin``), under BAPO's adapted bounds when BAPO is on (``bapo``, set by
    ``Prepasses``). Per micro-batch, as the released code's policy loss (which verl calls per micro-batch); one more
    chunk x vocab matmul per token."""

    entropy = False

    def __init__(self, cfg: TrainConfig, targets: TokenTargets):
        self.cfg, self.targets = cfg, targets
        n = targets.teacher_logprobs_N.shape[0]
        self.student_N = torch.zeros(n, dtype=torch.float64, device=targets.teacher_logprobs_N.device)
        self.stats: Metrics = {}
        self.bapo: BapoBounds | None = None

    def chunk(self, stats: TokenStats, start: int, end: int) -> None:
        self.student_N[start:end] = stats.target_logprobs

    def done(self) -> None:
        c, t, lc = self.cfg.methods.cov, self.targets, self.cfg.lightning
        advantage_N = lightning_advantage(self.cfg, t, self.student_N)
        eligible_N = None
        if c.mode == "clip_cov" and lc.importance == "ppo_clip":
            low, high = ((1.0 - lc.clip_eps_low, 1.0 + lc.clip_eps_high) if self.bapo is None else self.bapo.bounds)
            ratio_N = (self.student_N - t.behavior_logprobs_N.double()).clamp(-L.LOG_RATIO_LIMIT,
                                                                              L.LOG_RATIO_LIMIT).exp()
            eligible_N = ~(ratio_N.clamp(low, high) * advantage_N < ratio_N * advantage_N)  # PPO-clip not active
        selected_N, cov_N = L.covariance_select(self.student_N, advantage_N, mode=c.mode, frac=c.frac,
                                                cov_low=c.cov_low, cov_high=c.cov_high, eligible_N=eligible_N)
        dtype = t.teacher_logprobs_N.dtype
        if c.mode == "clip_cov" and selected_N.any():
            t.pg_keep_N = (~selected_N).to(dtype)
        elif c.mode == "kl_cov" and c.kl_coef:
            t.pg_kl_coef_N = selected_N.to(dtype) * c.kl_coef
        self.stats = {"cov/selected_frac": selected_N.float().mean(), "cov/mean": cov_N.float().mean(),
                      "cov/cov_max": cov_N.float().max() if cov_N.numel() else cov_N.new_zeros((), dtype=torch.float32)}


class TipSelection:
    """TIP's token selection as the chunked head's no-grad pre-pass (``pipeline.train.head.HeadPrepass``): it gathers
    each token's entropy and divergence from the teacher, then keeps ``tip_kept_count(N, rho)`` of the
    micro-batch's N tokens (soft-OR: the top scores, ``tip_soft_or_scores``; Q3-only: the top
    ``tip_q3_only_scores``; entropy mode: sampled by ``tip_entropy_probs``) and weighs the kept ones by (the methods'
    weights) x ``scale``, the step's valid over kept tokens, so the kept weights average 1 over the step and the loss
    keeps its scale.

    D is the bucket divergence over the teacher's top-k and the tail when a top-k loss is on (soft-OR and Q3-only:
    reverse KL KL(p_S || p_T), the OPD objective; entropy mode: JS, bounded by ln 2), else
    |log p_T(y_t) - log p_S(y_t)| of the sampled token (our stand-in where the shards hold no buckets). The
    selection is per micro-batch: a per-step top-rho over several micro-batches would need every micro-batch's
    scores before the first loss, a second decoder forward of each. Cost: one more chunk x vocab matmul per token
    (no gradient) and an O(N) buffer; in exchange the loss pass (logits, tail log-sum-exp, gradient) runs on the
    kept tokens only (``done`` returns them; ``Prepasses`` cuts ``targets`` to them): the head does one matmul per
    token and three per kept token, (1 + 3 rho) / 3 of the plain head's work. Peak memory stays one chunk of logits."""

    entropy = True

    def __init__(self, tip: TipConfig, targets: TokenTargets, vocab_size: int, buckets: bool, tail_bucket: bool,
                 scale: torch.Tensor):
        self.tip, self.targets, self.vocab_size, self.buckets, self.scale = tip, targets, vocab_size, buckets, scale
        self.tail_bucket = tail_bucket
        n = targets.teacher_logprobs_N.shape[0]
        device = targets.teacher_logprobs_N.device
        self.entropy_N = torch.zeros(n, dtype=torch.float64, device=device)
        self.divergence_N = torch.zeros(n, dtype=torch.float64, device=device)
        self.stats: Metrics = {}

    def chunk(self, stats: TokenStats, start: int, end: int) -> None:
        self.entropy_N[start:end] = stats.entropy
        t = self.targets
        if self.buckets:
            student_n_B = torch.cat([stats.topk_logprobs, stats.tail_logprob.unsqueeze(-1)], -1)
            teacher_n_B = torch.cat([t.topk_logprobs_N_K[start:end], t.tail_logprob_N[start:end].unsqueeze(-1)], -1)
            teacher_n_B = teacher_n_B.to(student_n_B.dtype)
            if not self.tail_bucket:
                student_n_B, teacher_n_B = student_n_B[:, :-1].log_softmax(-1), teacher_n_B[:, :-1].log_softmax(-1)
            divergence_n = (L._jsd_B_T(student_n_B, teacher_n_B, 0.5) if self.tip.mode == "entropy"
                            else L._reverse_kl_B_T(student_n_B, teacher_n_B))
        else:
            divergence_n = (t.teacher_logprobs_N[start:end] - stats.target_logprobs).abs()
        self.divergence_N[start:end] = divergence_n

    def done(self) -> torch.Tensor | None:
        tip = self.tip
        if self.entropy_N.numel() == 0:  # a micro-batch without tokens (an empty response, an idle copy)
            zero = self.entropy_N.new_zeros((), dtype=torch.float32)
            self.stats = {"weights/tip_kept": zero, "tip/entropy_mean": zero, "tip/kept_entropy_mean": zero}
            return None
        if tip.mode in ("soft_or", "q3_only"):
            score = tip_soft_or_scores if tip.mode == "soft_or" else tip_q3_only_scores
            kept_N = tip_keep(score(self.entropy_N, self.divergence_N), tip.rho, sample=False)
        else:
            probs_N = tip_entropy_probs(self.entropy_N, self.divergence_N, self.vocab_size, tip.alpha, tip.gamma)
            kept_N = tip_keep(probs_N, tip.rho, sample=True)
        keep_N = kept_N.to(self.targets.teacher_logprobs_N.dtype) * self.scale.to(self.targets.teacher_logprobs_N)
        w_N = self.targets.weights_N
        self.targets.weights_N = keep_N if w_N is None else w_N * keep_N
        self.stats = {"weights/tip_kept": kept_N.float().mean(), "tip/entropy_mean": self.entropy_N.float().mean(),
                      "tip/kept_entropy_mean": self.entropy_N[kept_N].float().mean()}
        return None if bool(kept_N.all()) else kept_N.nonzero().squeeze(-1)
