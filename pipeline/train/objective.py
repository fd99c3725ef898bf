"""A micro-batch's loss: the step's global normalisers, the weighting methods' weights, the configured loss
terms over the chunked head's per-token statistics, and diagnostics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import ANCHOR_LOSSES, TOPK_LOSSES, TrainConfig
from pipeline.train import losses as L
from pipeline.train.batching import Batch, TokenTargets, flatten_targets
from pipeline.train.head import Metrics, TokenStats
from pipeline.train.selection import BapoBounds, CovSelection, Prepasses, TipSelection
from pipeline.train.student import StudentLM, unwrap
from pipeline.train.weighting import RolloutTable, mean_one, paced_kernel, position_weights, route_mask, tip_kept_count


@dataclass
class StepNorms:
    """The step's global normalisers, summed over its micro-batches and ranks: valid tokens and sequences,
    the same for each routed subset of rows (``routed[route] = (tokens, sequences)``), and the factor that
    brings the PACED kernel to mean 1 over the step's rows (None without PACED), and TIP's weight of a kept token,
    the step's valid tokens over its kept ones (None without TIP)."""

    token: torch.Tensor
    seq: torch.Tensor
    routed: dict[str, tuple[torch.Tensor, torch.Tensor]]
    paced_scale: torch.Tensor | None = None
    tip_scale: torch.Tensor | None = None


def _routes(cfg: TrainConfig) -> list[str]:
    """The row routes other than "all" that the step's loss terms use, in a fixed order."""
    return sorted({cfg.route(name) for name, w in cfg.losses.items() if w != 0} - {"all"})


def local_step_sums(cfg: TrainConfig, micro_batches: list[Batch]) -> list[float]:
    """This rank's share of the sums behind ``StepNorms`` beyond the plain counts: routed tokens and sequences
    per route, then the PACED kernel's sum and row count, then the tokens TIP keeps. Empty with none of them."""
    sums: list[float] = []
    for route in _routes(cfg):
        tokens = seqs = 0
        for b in micro_batches:
            valid_B_T = b.mask_B_T.bool() & route_mask(route, b.reward_B, b.pass_rate_B).unsqueeze(-1)
            tokens, seqs = tokens + int(valid_B_T.sum()), seqs + int(valid_B_T.any(-1).sum())
        sums += [tokens, seqs]
    if cfg.methods.paced is not None:
        p = cfg.methods.paced
        rows_B = [b.mask_B_T.bool().any(-1) for b in micro_batches]
        sums += [sum(float(paced_kernel(b.pass_rate_B, p.alpha, p.beta)[r].double().sum())
                     for b, r in zip(micro_batches, rows_B)),
                 sum(int(r.sum()) for r in rows_B)]
    if cfg.methods.tip is not None:  # TIP keeps ceil(rho N) of each micro-batch's N tokens
        sums.append(sum(tip_kept_count(int(b.mask_B_T.sum()), cfg.methods.tip.rho) for b in micro_batches))
    if weight_sum_norm(cfg):
        sums += local_weight_sums(cfg, micro_batches)
    return sums


def weight_sum_norm(cfg: TrainConfig) -> bool:
    """Whether the terms are normalised by the step's sums of the weights (``weight_norm: sum`` with a weighting
    method on) rather than by its counts."""
    m = cfg.methods
    return cfg.weight_norm == "sum" and any(x is not None for x in (m.paced, m.scope, m.position))


def local_weight_sums(cfg: TrainConfig, micro_batches: list[Batch]) -> list[float]:
    """``weight_norm: sum``: this rank's sums of the weighting methods' per-token weights w_t (PACED unscaled: its
    mean-one factor cancels in a weighted mean) for "all" rows and then each route of ``_routes``:

        token normaliser  sum_t w_t                 sequence normaliser  sum_i mean_{t in i} w_t

    over the valid (routed) tokens; with all-ones weights these are the counts of ``StepNorms``."""
    routes = ["all", *_routes(cfg)]
    sums = [0.0] * (2 * len(routes))
    for b in micro_batches:
        w_B_T = method_weights(cfg, b, torch.ones(()))[0].double()  # once per micro-batch, read by every route
        for i, route in enumerate(routes):
            valid_B_T = b.mask_B_T.bool()
            if route != "all":
                valid_B_T = valid_B_T & route_mask(route, b.reward_B, b.pass_rate_B).unsqueeze(-1)
            routed_B_T = torch.where(valid_B_T, w_B_T, 0.0)
            sums[2 * i] += float(routed_B_T.sum())
            sums[2 * i + 1] += float((routed_B_T.sum(-1) / b.mask_B_T.sum(-1).clamp_min(1)).sum())
    return sums


def step_norms(cfg: TrainConfig, token: torch.Tensor, seq: torch.Tensor, sums: torch.Tensor) -> StepNorms:
    """``StepNorms`` from the global counts and the all-reduced ``local_step_sums``."""
    routes = _routes(cfg)
    routed = {route: (sums[2 * i].clamp_min(1).float(), sums[2 * i + 1].clamp_min(1).float())
              for i, route in enumerate(routes)}
    at = 2 * len(routes)
    paced_scale = tip_scale = None
    if cfg.methods.paced is not None:
        total_weight, total_rows = sums[at], sums[at + 1]
        paced_scale = mean_one(torch.ones((), dtype=total_weight.dtype), total_weight, total_rows).float()
        at += 2
    if cfg.methods.tip is not None:
        tip_scale = (token.double() / sums[at].double().clamp_min(1)).float()
        at += 1
    if weight_sum_norm(cfg):  # a weighted mean: the sums of the weights replace the counts
        weight_sums = sums[at:].clamp_min(torch.finfo(torch.float32).tiny)
        token, seq = weight_sums[0].to(token), weight_sums[1].to(seq)
        routed = {route: (weight_sums[2 + 2 * i].to(token), weight_sums[3 + 2 * i].to(seq))
                  for i, route in enumerate(routes)}
        paced_scale = None if paced_scale is None else torch.ones_like(paced_scale)
    return StepNorms(token, seq, routed, paced_scale, tip_scale)


def method_weights(cfg: TrainConfig, batch: Batch, paced_scale: torch.Tensor | None
                   ) -> tuple[torch.Tensor | None, Metrics]:
    """The product of the on weighting methods' per-token weights ``[B, T]`` (None when none is on), and each
    method's weight statistics over the valid tokens: ``weights/<method>_mean``, ``_token_max`` and ``_kept`` (the
    share of tokens with a non-zero weight)."""
    m = cfg.methods
    parts: dict[str, torch.Tensor] = {}
    if batch.row_weight_B is not None:
        parts["scope"] = batch.row_weight_B.unsqueeze(-1).expand_as(batch.mask_B_T).float()
    if m.paced is not None:
        kernel_B = paced_kernel(batch.pass_rate_B, m.paced.alpha, m.paced.beta) * paced_scale.to(batch.pass_rate_B)
        parts["paced"] = kernel_B.unsqueeze(-1).expand_as(batch.mask_B_T).float()
    if m.position is not None:
        parts["position"] = position_weights(batch.teacher_logprobs_B_T - batch.behavior_logprobs_B_T,
                                             batch.mask_B_T, m.position.gamma)
    weights_B_T = None
    stats: Metrics = {}
    valid_B_T = batch.mask_B_T.bool()
    for name, w_B_T in parts.items():
        weights_B_T = w_B_T if weights_B_T is None else weights_B_T * w_B_T
        stats[f"weights/{name}_mean"] = L._masked_mean(w_B_T, valid_B_T)
        stats[f"weights/{name}_token_max"] = L._masked_max(w_B_T, valid_B_T)
        stats[f"weights/{name}_kept"] = L._masked_mean((w_B_T > 0).float(), valid_B_T)
    return weights_B_T, stats


def compute_losses(cfg: TrainConfig, stats: TokenStats, targets: TokenTargets, mask_B_T: torch.Tensor,
                   token_normalizer: torch.Tensor, seq_normalizer: torch.Tensor,
                   routed: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                   ratio_bounds: tuple[float, float] | None = None) -> tuple[torch.Tensor, Metrics]:
    """Weighted sum of the configured loss terms over gathered per-token quantities (``stats`` of the student,
    ``targets`` of the teacher, same ``[B, T]`` layout); each term normalised by the step's global counts.

    A term routed to a subset of rows (``cfg.rows``) reads only their tokens and is normalised by the step's
    global counts of that subset (``routed[route] = (tokens, sequences)``); ``targets.weights_N`` (the weighting
    methods) multiply every term's per-token reduction weights. ``ratio_bounds``: BAPO's clip range for
    ``lightning``'s PPO-clip form. Diagnostics of the student against the teacher and the rollout policy are added
    to the metrics (``diagnostics``)."""
    terms: dict[str, tuple[torch.Tensor, Metrics]] = {}
    weights_B_T = targets.weights_N
    routed_frac: Metrics = {}
    for name, weight in cfg.losses.items():
        if weight == 0:
            continue
        route = cfg.route(name)
        term_mask_B_T, tok_norm, seq_norm = mask_B_T, token_normalizer, seq_normalizer
        if route != "all":
            term_mask_B_T = mask_B_T.bool() & route_mask(route, targets.reward_N, targets.pass_rate_N)
            tok_norm, seq_norm = routed[route]
            routed_frac[f"rows/{name}_frac"] = L._masked_mean(term_mask_B_T.float(), mask_B_T.bool())
        if name in TOPK_LOSSES:
            extra = {"jsd_topk": {"beta": cfg.jsd_beta}, "akl_topk": {"head_mass": cfg.akl_head_mass},
                     "alpha_topk": {"alpha": cfg.alpha_divergence}}.get(name, {})
            terms[name] = getattr(L, name)(stats.topk_logprobs, stats.tail_logprob, targets.topk_logprobs_N_K,
                                           targets.tail_logprob_N, term_mask_B_T, tail_bucket=cfg.tail_bucket,
                                           normalizer=tok_norm, weights_B_T=weights_B_T,
                                           token_clip=None if cfg.methods.opsd is None else cfg.methods.opsd.clip,
                                           **extra)
        elif name == "lightning":
            lc, gopd = cfg.lightning, cfg.methods.gopd
            sequence = lc.normalization == "sequence"
            lightning_weights_B_T = targets.seq_weights_N if sequence else None
            if weights_B_T is not None:
                lightning_weights_B_T = weights_B_T if not sequence else lightning_weights_B_T * weights_B_T
            if targets.pg_keep_N is not None:
                lightning_weights_B_T = (targets.pg_keep_N if lightning_weights_B_T is None
                                         else lightning_weights_B_T * targets.pg_keep_N)
            terms[name] = L.lightning_pg(
                stats.target_logprobs, targets.teacher_logprobs_N, targets.behavior_logprobs_N, term_mask_B_T,
                importance=lc.importance, is_cap=lc.is_cap, clip_eps_low=lc.clip_eps_low,
                clip_eps_high=lc.clip_eps_high, advantage_clip=lc.advantage_clip, normalization=lc.normalization,
                normalizer=seq_norm if sequence else tok_norm, weights_B_T=lightning_weights_B_T,
                reward_scale=1.0 if gopd is None else gopd.lam, k3_guard=0.0 if gopd is None else gopd.k3_guard,
                ratio_bounds=ratio_bounds, abs_kl_coef_B_T=targets.pg_kl_coef_N)
        elif name == "kdrl":
            lc = cfg.lightning
            terms[name] = L.kdrl(stats.target_logprobs, targets.teacher_logprobs_N, targets.behavior_logprobs_N,
                                 targets.advantage_N, targets.reward_N <= 0, term_mask_B_T, beta=cfg.kdrl_beta,
                                 is_cap=cfg.kdrl_is_cap, clip_eps_low=lc.clip_eps_low, clip_eps_high=lc.clip_eps_high,
                                 normalizer=tok_norm, weights_B_T=weights_B_T)
        elif name == "sft":
            terms[name] = L.sft_cross_entropy(stats.target_logprobs, term_mask_B_T, normalizer=tok_norm,
                                              weights_B_T=weights_B_T)
        elif name in ANCHOR_LOSSES:
            terms[name] = L.anchor_divergence(stats.target_logprobs, targets.behavior_logprobs_N, term_mask_B_T,
                                              generator=name.removeprefix("anchor_"), alpha=cfg.alpha_divergence,
                                              normalizer=tok_norm, weights_B_T=weights_B_T)
    loss, metrics = L.combined_loss(terms, {name: cfg.losses[name] for name in terms})
    return loss, {**metrics, **routed_frac, **diagnostics(stats, targets, mask_B_T)}


def diagnostics(stats: TokenStats, targets: TokenTargets, mask_B_T: torch.Tensor) -> Metrics:
    """Per-token diagnostics, means over the valid tokens (run inside the chunked head's loss callback):

        diag/drift_kl            E_mu[rho log rho], rho = p_theta(y_t) / mu(y_t): an importance-weighted
                                 estimate of KL(p_theta || mu) on the rollout policy's sampled tokens
        diag/student_topk_mass   sum_k p_theta(k) over the teacher's top-k ids (with top-k stats)
        diag/top1_agree          argmax p_theta == the teacher's top-1 id (with top-k stats and the argmax)
        weights/mean, weights/token_max   the weighting methods' per-token weights (when one is on)
    """
    valid_B_T = mask_B_T.bool()
    log_ratio_B_T = (stats.target_logprobs.detach() - targets.behavior_logprobs_N).clamp(-L.LOG_RATIO_LIMIT,
                                                                                       L.LOG_RATIO_LIMIT)
    out = {"diag/drift_kl": L._masked_mean(log_ratio_B_T.exp() * log_ratio_B_T, valid_B_T)}
    if stats.topk_logprobs is not None:
        out["diag/student_topk_mass"] = L._masked_mean(stats.topk_logprobs.detach().exp().sum(-1), valid_B_T)
        if stats.argmax_ids is not None:
            agree_B_T = (stats.argmax_ids == targets.topk_ids_N_K[..., 0]).float()
            out["diag/top1_agree"] = L._masked_mean(agree_B_T, valid_B_T)
    if targets.weights_N is not None:
        out["weights/mean"] = L._masked_mean(targets.weights_N, valid_B_T)
        out["weights/token_max"] = L._masked_max(targets.weights_N, valid_B_T)
    return out


def gopd_reference_needed(cfg: TrainConfig) -> bool:
    """Whether the run needs G-OPD's frozen reference model: lam != 1 with a top-k loss in some step."""
    g = cfg.methods.gopd
    return g is not None and g.lam != 1.0 and bool(cfg.all_losses() & TOPK_LOSSES)


def gopd_reference_path(cfg: TrainConfig) -> Path:
    """G-OPD's reference model dir: ``methods.gopd.reference``, by default the student training starts from."""
    return cfg.methods.gopd.reference or cfg.student


def gopd_topk_targets(reference: torch.nn.Module, cfg: TrainConfig, batch: Batch, targets: TokenTargets) -> Metrics:
    """G-OPD's top-k form: the reference model's log-probs at the teacher's top-k ids and tail (a no-grad forward
    of the micro-batch), and ``targets``' top-k + tail replaced by q ~ p_T^lam p_ref^(1 - lam)
    (``pipeline.train.losses.gopd_topk_target``). Metric ``gopd/kl_q_teacher``: KL(q || p_T) over the buckets, mean per
    token (how far the extrapolated target moved from the teacher)."""
    with torch.no_grad():
        ref, _ = reference(batch.input_ids_B_L, batch.attention_B_L, batch.mask_B_T.bool(), None,
                           topk_ids_N_K=targets.topk_ids_N_K, chunk_tokens=cfg.logits_chunk_tokens, pack=cfg.packing)
    teacher_N_K, teacher_tail_N = targets.topk_logprobs_N_K, targets.tail_logprob_N
    q_N_K, q_tail_N = L.gopd_topk_target(teacher_N_K, teacher_tail_N, ref.topk_logprobs, ref.tail_logprob,
                                         cfg.methods.gopd.lam)
    targets.topk_logprobs_N_K, targets.tail_logprob_N = q_N_K, q_tail_N
    q = torch.cat([q_N_K, q_tail_N[:, None]], -1).double()
    teacher = torch.cat([teacher_N_K, teacher_tail_N[:, None]], -1).double()
    kl_N = (q.exp() * (q - teacher)).sum(-1)
    return {"gopd/kl_q_teacher": kl_N.mean() if kl_N.numel() else kl_N.new_zeros(())}


def micro_batch_loss(model: torch.nn.Module, cfg: TrainConfig, batch: Batch, token_normalizer: torch.Tensor,
                     seq_normalizer: torch.Tensor, norms: StepNorms | None = None,
                     reference: torch.nn.Module | None = None) -> tuple[torch.Tensor, Metrics]:
    """One micro-batch's share of the step loss through the chunked LM head (``model`` is a ``StudentLM``,
    possibly wrapped by DDP / FSDP2). ``batch`` must be on the model's device. ``norms`` carries the step's
    routed counts and PACED scale (needed only with routing or PACED); with it, pass ``norms.token`` and
    ``norms.seq`` as the normalisers (the sums of the weights under ``weight_norm: sum``). ``reference``:
    G-OPD's frozen reference model (``prepare_reference``), read when a top-k loss runs with
    ``methods.gopd.lam`` != 1."""
    select_B_T = batch.mask_B_T.bool()
    weights_B_T, weight_stats = method_weights(cfg, batch, None if norms is None else norms.paced_scale)
    targets = flatten_targets(batch, weights_B_T)
    need_topk = bool(set(cfg.losses) & TOPK_LOSSES)
    topk_terms = {name for name, w in cfg.losses.items() if w != 0} & TOPK_LOSSES
    if topk_terms and cfg.methods.gopd is not None and cfg.methods.gopd.lam != 1.0:
        if reference is None:
            raise ValueError("G-OPD's top-k form (methods.gopd.lam != 1 with a top-k loss) needs the reference "
                             "model: pass reference= (pipeline.train.student.prepare_reference)")
        weight_stats = {**weight_stats, **gopd_topk_targets(reference, cfg, batch, targets)}
    routed = None if norms is None else norms.routed
    prepasses: list[TipSelection | BapoBounds | CovSelection] = []
    if cfg.methods.tip is not None:
        scale = norms.tip_scale if norms is not None else torch.ones(())
        prepasses.append(TipSelection(cfg.methods.tip, targets, unwrap(model).config.vocab_size, need_topk,
                                      cfg.tail_bucket, scale))
    bapo = None
    if cfg.methods.bapo is not None and cfg.losses.get("lightning", 0) != 0:
        bapo = BapoBounds(cfg, targets)
        prepasses.append(bapo)
    if cfg.methods.cov is not None and cfg.losses.get("lightning", 0) != 0:
        prepasses.append(CovSelection(cfg, targets))

    def chunk_loss(stats: TokenStats, start: int, end: int) -> tuple[torch.Tensor, Metrics]:
        valid_1_n = torch.ones(1, end - start, dtype=torch.bool, device=stats.target_logprobs.device)
        return compute_losses(cfg, stats[None], targets.rows(start, end), valid_1_n, token_normalizer, seq_normalizer,
                              routed, None if bapo is None else bapo.bounds)

    loss, metrics = model(batch.input_ids_B_L, batch.attention_B_L, select_B_T, chunk_loss,
                          topk_ids_N_K=targets.topk_ids_N_K if need_topk else None,
                          chunk_tokens=cfg.logits_chunk_tokens, argmax=need_topk, pack=cfg.packing,
                          prepass=Prepasses(prepasses, targets) if prepasses else None)
    return loss, {**metrics, **weight_stats, **{k: v for p in prepasses for k, v in p.stats.items()}}


def batch_loss(cfg: TrainConfig, lm: torch.nn.Module, batch: Batch) -> float:
    """The step loss of one whole batch under ``lm`` (a Hugging Face model), normalised by its own counts."""
    mask_B_T = batch.mask_B_T.bool()
    token_norm = mask_B_T.sum().float().clamp_min(1)
    seq_norm = mask_B_T.any(-1).sum().float().clamp_min(1)
    norms = step_norms(cfg, token_norm, seq_norm, torch.tensor(local_step_sums(cfg, [batch]), dtype=torch.float64))
    loss, _ = micro_batch_loss(StudentLM(lm), cfg, batch, norms.token, norms.seq, norms)
    return float(loss.detach())


class SftObjective:
    """Next-token cross-entropy on the response tokens (the ``sft`` stage, the demo's teacher bootstrap and its
    SFT controls): every micro-batch divides by the step's global count of response tokens, so any world size,
    micro-batching and packing take the same optimiser steps."""

    def __init__(self, chunk_tokens: int | None = None, packing: bool = False):
        self.chunk_tokens, self.packing = chunk_tokens, packing

    def at_step(self, step: int) -> "SftObjective":
        return self

    def local_sums(self, micro_batches: list[Batch]) -> list[float]:
        return []

    def step_norms(self, token: torch.Tensor, seq: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
        return token

    def loss(self, model: torch.nn.Module, batch: Batch, token_norm: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        def chunk(stats: TokenStats, start: int, end: int) -> tuple[torch.Tensor, Metrics]:
            valid_1_n = torch.ones(1, end - start, dtype=torch.bool, device=stats.target_logprobs.device)
            return L.sft_cross_entropy(stats.target_logprobs[None], valid_1_n, normalizer=token_norm)

        return model(batch.input_ids_B_L, batch.attention_B_L, batch.mask_B_T.bool(), chunk,
                     chunk_tokens=self.chunk_tokens, pack=self.packing)


class OpdObjective:
    """The configured OPD loss terms and methods (``micro_batch_loss``) with their step normalisers
    (``local_step_sums`` / ``step_norms``); ``rollouts``: the prompt statistics, when a method reads them;
    ``reference``: G-OPD's frozen reference model, when its top-k form is on. ``at_step`` applies the loss
    schedule."""

    def __init__(self, cfg: TrainConfig, rollouts: RolloutTable | None = None,
                 reference: torch.nn.Module | None = None):
        self.cfg, self.rollouts, self.reference = cfg, rollouts, reference

    def at_step(self, step: int) -> "OpdObjective":
        if not self.cfg.loss_schedule:
            return self
        return OpdObjective(self.cfg.model_copy(update={"losses": self.cfg.losses_at(step)}), self.rollouts,
                            self.reference)

    def local_sums(self, micro_batches: list[Batch]) -> list[float]:
        return local_step_sums(self.cfg, micro_batches)

    def step_norms(self, token: torch.Tensor, seq: torch.Tensor, sums: torch.Tensor) -> StepNorms:
        return step_norms(self.cfg, token, seq, sums)

    def loss(self, model: torch.nn.Module, batch: Batch, norms: StepNorms) -> tuple[torch.Tensor, Metrics]:
        return micro_batch_loss(model, self.cfg, batch, norms.token, norms.seq, norms, self.reference)
