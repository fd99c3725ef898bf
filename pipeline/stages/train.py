"""Stage 4: the offline OPD trainer (Lightning OPD). Streams batches from the teacher top-k shards and never
loads a teacher (``run_train``). ``run_online_train`` is the standard online OPD baseline for comparison: the
student samples and a live teacher scores every step, same losses, same loop.

The loop in four parts: set-up and resume (``_train``), a batch source (``ShardBatches`` or ``OnlineBatches``,
one small protocol), the step (``train_step``: micro-batches by count or token budget through the chunked LM
head), and logging / checkpointing. Resumable: every ``checkpoint_every`` steps a sharded checkpoint
(``pipeline.checkpoint``) holds model, optimiser, scheduler, each rank's RNG and stream position; a rerun
continues from the latest and, on CPU in deterministic mode, reproduces the uninterrupted loss curve exactly.
Runs under ``torchrun`` (DDP, or FSDP2 / HSDP with ``fsdp: true``); one process is the same code with world
size 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from lopd.errors import LopdUserError
from pipeline import checkpoint
from pipeline import losses as L
from pipeline.config import ANCHOR_LOSSES, MethodsConfig, OnlineConfig, TipConfig, TrainConfig
from pipeline.fingerprint import check_shard_teacher, model_fingerprint, read_provenance, shard_data_fingerprint
from pipeline.head import Metrics, TokenStats, merge_chunk_metrics
from pipeline.models import encode_prompt, load_tokenizer
from pipeline.progress import log, progress_bar
from pipeline.stages.common import StageResult, require_model_dir, require_shard_set
from pipeline.training import (
    DistInfo,
    MetricsWriter,
    StepMeter,
    StudentLM,
    all_reduce_sum,
    autocast_context,
    count_flop_params,
    detect_peak_tflops,
    device_for,
    load_student,
    make_optimizer,
    make_scheduler,
    pad_batch,
    plot_metrics,
    prepare_reference,
    prepare_student,
    save_trained_model,
    seed_everything,
    setup_distributed,
    split_by_token_budget,
    unwrap,
)
from pipeline.weighting import (
    RolloutTable,
    mean_one,
    paced_kernel,
    position_weights,
    route_mask,
    source_key,
    tip_entropy_probs,
    tip_keep,
    tip_kept_count,
    tip_soft_or_scores,
)
from storage.prefetch import prefetch
from storage.prompt_stats import load_prompt_stats, require_group_stats
from storage.reader import ReaderState, iter_batches
from storage.records import TeacherRecord
from storage.shardset import ShardSet, file_sha256

TOPK_LOSSES = {"reverse_kl_topk", "forward_kl_topk", "jsd_topk", "tvd_topk", "akl_topk", "alpha_topk"}


@dataclass
class Batch:
    """Tensors for one micro-batch; the ``_B_T`` tensors are aligned with the shifted targets."""

    input_ids_B_L: torch.Tensor
    attention_B_L: torch.Tensor
    mask_B_T: torch.Tensor
    teacher_logprobs_B_T: torch.Tensor
    behavior_logprobs_B_T: torch.Tensor
    topk_ids_B_T_K: torch.Tensor
    topk_logprobs_B_T_K: torch.Tensor
    tail_logprob_B_T: torch.Tensor
    reward_B: torch.Tensor | None = None  # each rollout's reward, NaN where the shard holds none
    pass_rate_B: torch.Tensor | None = None  # its prompt's pass rate (only with prompt statistics)
    row_weight_B: torch.Tensor | None = None  # fixed per-rollout method weights (SCOPE) from the statistics
    advantage_B: torch.Tensor | None = None  # group-normalised reward of the rollout (KDRL) from the statistics

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(*(None if (v := getattr(self, f)) is None else v.to(device, non_blocking=non_blocking)
                       for f in self.__dataclass_fields__))

    def pin_memory(self) -> "Batch":
        """The same tensors in page-locked host memory: their copy to the GPU (``to(device, non_blocking=True)``)
        is then a DMA that does not wait for the host."""
        return Batch(*(None if (v := getattr(self, f)) is None else v.pin_memory() for f in self.__dataclass_fields__))


def collate(records: list[TeacherRecord], pad_id: int, rollouts: RolloutTable | None = None) -> Batch:
    """Right-pad token ids; scatter each record's per-response-position arrays to target positions
    ``prompt_len-1 .. len-2`` of the shifted sequence (exactly where ``mask_B_T`` is true, row by row).
    ``rollouts`` (the shard set's prompt statistics) adds each row's pass rate and fixed method weight."""
    input_ids_B_L, attention_B_L, mask_B_T = pad_batch([r.token_ids for r in records],
                                                       [r.prompt_len for r in records], pad_id)
    B, T = mask_B_T.shape
    K = records[0].topk_ids.shape[1]
    where = mask_B_T.numpy()

    def scatter(parts: list[np.ndarray], fill: float, dtype: type, tail: tuple[int, ...] = ()) -> torch.Tensor:
        out = np.full((B, T, *tail), fill, dtype=dtype)
        out[where] = np.concatenate(parts).astype(dtype, copy=False)
        return torch.from_numpy(out)

    return Batch(
        input_ids_B_L, attention_B_L, mask_B_T,
        scatter([r.teacher_logprobs for r in records], 0.0, np.float32),
        scatter([r.behavior_logprobs for r in records], 0.0, np.float32),
        scatter([r.topk_ids for r in records], 0, np.int64, (K,)),
        scatter([r.topk_logprobs for r in records], -1e4, np.float32, (K,)),
        scatter([r.tail_logprob for r in records], -1e4, np.float32),
        torch.tensor([np.nan if r.reward is None else r.reward for r in records], dtype=torch.float32),
        *_row_stats(records, rollouts),
    )


def _row_stats(records: list[TeacherRecord], rollouts: RolloutTable | None
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(pass_rate_B, row_weight_B, advantage_B) of these records from the prompt statistics (None without)."""
    if rollouts is None:
        return None, None, None
    rows = rollouts.rows([(r.prompt_id, r.sample_index) for r in records])
    row_weight = None if rollouts.row_weight_R is None else torch.from_numpy(rollouts.row_weight_R[rows])
    advantage = None if rollouts.advantage_R is None else torch.from_numpy(rollouts.advantage_R[rows])
    return torch.from_numpy(rollouts.pass_rate_R[rows]), row_weight, advantage


@dataclass
class TokenTargets:
    """The teacher's side of the selected tokens of a micro-batch, flattened in row-major order (the order of
    ``StudentLM``'s selected hidden states). ``seq_weights_N``: 1 / (valid tokens of the token's row), the
    reduction weight of the "sequence" normalisation over whole rows. ``weights_N``: the weighting methods'
    per-token weights (None when none is on: the plain loss); ``reward_N`` / ``pass_rate_N``: the token's row's
    reward and prompt pass rate, for the per-term row routing (None when unknown); ``advantage_N``: the row's
    group-normalised reward (KDRL). The head's pre-pass methods may set ``weights_N`` and the ``pg_*`` fields and
    cut every field to the tokens TIP keeps (``Prepasses``)."""

    teacher_logprobs_N: torch.Tensor
    behavior_logprobs_N: torch.Tensor
    topk_ids_N_K: torch.Tensor
    topk_logprobs_N_K: torch.Tensor
    tail_logprob_N: torch.Tensor
    seq_weights_N: torch.Tensor
    weights_N: torch.Tensor | None = None
    reward_N: torch.Tensor | None = None
    pass_rate_N: torch.Tensor | None = None
    advantage_N: torch.Tensor | None = None
    pg_keep_N: torch.Tensor | None = None  # Clip-Cov: 0 where lightning's term loses its gradient
    pg_kl_coef_N: torch.Tensor | None = None  # KL-Cov: coefficient of |log p_theta - log mu| in lightning's term

    def rows(self, start: int, end: int) -> "TokenTargets":
        """Tokens ``start:end`` as one ``[1, n]`` row, the shape the losses take."""
        return TokenTargets(*(None if (v := getattr(self, f.name)) is None else v[start:end].unsqueeze(0)
                              for f in fields(self)))


def flatten_targets(batch: Batch, weights_B_T: torch.Tensor | None = None) -> TokenTargets:
    select_B_T = batch.mask_B_T.bool()

    def per_token(row_B: torch.Tensor | None) -> torch.Tensor | None:
        return None if row_B is None else row_B.unsqueeze(-1).expand_as(select_B_T)[select_B_T]

    return TokenTargets(batch.teacher_logprobs_B_T[select_B_T], batch.behavior_logprobs_B_T[select_B_T],
                        batch.topk_ids_B_T_K[select_B_T], batch.topk_logprobs_B_T_K[select_B_T],
                        batch.tail_logprob_B_T[select_B_T], L.reduction_weights(select_B_T, "sequence")[select_B_T],
                        None if weights_B_T is None else weights_B_T[select_B_T],
                        per_token(batch.reward_B), per_token(batch.pass_rate_B), per_token(batch.advantage_B))


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
        stats[f"weights/{name}_token_max"] = torch.where(valid_B_T, w_B_T, 0.0).max()
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
        out["weights/token_max"] = torch.where(valid_B_T, targets.weights_N, 0.0).max()
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
    (``pipeline.losses.gopd_topk_target``). Metric ``gopd/kl_q_teacher``: KL(q || p_T) over the buckets, mean per
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
                             "model: pass reference= (pipeline.training.prepare_reference)")
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


class Prepasses:
    """The methods' ``HeadPrepass``es in one pass over the head's chunks (TIP, BAPO, Clip-Cov / KL-Cov). When one
    of them (TIP) keeps a subset of the tokens, ``targets`` is cut to those rows, in the order the loss pass
    will see them."""

    def __init__(self, parts: list[Any], targets: TokenTargets):
        self.parts, self.targets = parts, targets
        self.entropy = any(p.entropy for p in parts)

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
    and ``advantage_clip`` included), then ``done`` adapts [c_lo, c_hi] (``pipeline.losses.bapo_bounds``) before the
    loss pass. Per micro-batch: the paper adapts over the step's batch, which is the same with one micro-batch
    per rank. Cost: one more chunk x vocab matmul per token, no gradient."""

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
                                    high_max=b.high_max, step=b.step, target=b.target)
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
    Per micro-batch (the paper: over the step's batch); one more chunk x vocab matmul per token."""

    entropy = False

    def __init__(self, cfg: TrainConfig, targets: TokenTargets):
        self.cfg, self.targets = cfg, targets
        n = targets.teacher_logprobs_N.shape[0]
        self.student_N = torch.zeros(n, dtype=torch.float64, device=targets.teacher_logprobs_N.device)
        self.stats: Metrics = {}

    def chunk(self, stats: TokenStats, start: int, end: int) -> None:
        self.student_N[start:end] = stats.target_logprobs

    def done(self) -> None:
        c, t = self.cfg.methods.cov, self.targets
        selected_N, cov_N = L.covariance_select(self.student_N, lightning_advantage(self.cfg, t, self.student_N),
                                                mode=c.mode, frac=c.frac, cov_low=c.cov_low, cov_high=c.cov_high)
        dtype = t.teacher_logprobs_N.dtype
        if c.mode == "clip_cov" and selected_N.any():
            t.pg_keep_N = (~selected_N).to(dtype)
        elif c.mode == "kl_cov" and c.kl_coef:
            t.pg_kl_coef_N = selected_N.to(dtype) * c.kl_coef
        self.stats = {"cov/selected_frac": selected_N.float().mean(), "cov/mean": cov_N.float().mean(),
                      "cov/cov_max": cov_N.float().max() if cov_N.numel() else cov_N.new_zeros((), dtype=torch.float32)}


class TipSelection:
    """TIP's token selection as the chunked head's no-grad pre-pass (``pipeline.head.HeadPrepass``): it gathers
    each token's entropy and divergence from the teacher, then keeps ``tip_kept_count(N, rho)`` of the
    micro-batch's N tokens (soft-OR: the top scores, ``tip_soft_or_scores``; entropy mode: sampled by
    ``tip_entropy_probs``) and weighs the kept ones by (the methods' weights) x ``scale``, the step's valid over
    kept tokens, so the kept weights average 1 over the step and the loss keeps its scale.

    D is the bucket divergence over the teacher's top-k and the tail when a top-k loss is on (soft-OR: reverse KL
    KL(p_S || p_T), the OPD objective; entropy mode: JS, bounded by ln 2), else |log p_T(y_t) - log p_S(y_t)| of
    the sampled token (our stand-in where the shards hold no buckets). The selection is per micro-batch: a
    per-step top-rho over several micro-batches would need every micro-batch's scores before the first loss, a
    second decoder forward of each. Cost: one more chunk x vocab matmul per token (no gradient) and an O(N)
    buffer; in exchange the loss pass (logits, tail log-sum-exp, gradient) runs on the kept tokens only (``done``
    returns them; ``Prepasses`` cuts ``targets`` to them): the head does one matmul per token and three per kept
    token, (1 + 3 rho) / 3 of the plain head's work. Peak memory stays one chunk of logits."""

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
            divergence_n = (L._reverse_kl_B_T(student_n_B, teacher_n_B) if self.tip.mode == "soft_or"
                            else L._jsd_B_T(student_n_B, teacher_n_B, 0.5))
        else:
            divergence_n = (t.teacher_logprobs_N[start:end] - stats.target_logprobs).abs()
        self.divergence_N[start:end] = divergence_n

    def done(self) -> torch.Tensor | None:
        tip = self.tip
        if tip.mode == "soft_or":
            kept_N = tip_keep(tip_soft_or_scores(self.entropy_N, self.divergence_N), tip.rho, sample=False)
        else:
            probs_N = tip_entropy_probs(self.entropy_N, self.divergence_N, self.vocab_size, tip.alpha, tip.gamma)
            kept_N = tip_keep(probs_N, tip.rho, sample=True)
        keep_N = kept_N.to(self.targets.teacher_logprobs_N.dtype) * self.scale.to(self.targets.teacher_logprobs_N)
        w_N = self.targets.weights_N
        self.targets.weights_N = keep_N if w_N is None else w_N * keep_N
        self.stats = {"weights/tip_kept": kept_N.float().mean(), "tip/entropy_mean": self.entropy_N.float().mean(),
                      "tip/kept_entropy_mean": self.entropy_N[kept_N].float().mean()}
        return None if bool(kept_N.all()) else kept_N.nonzero().squeeze(-1)


def batch_loss(cfg: TrainConfig, lm: torch.nn.Module, batch: Batch) -> float:
    """The step loss of one whole batch under ``lm`` (a Hugging Face model), normalised by its own counts."""
    mask_B_T = batch.mask_B_T.bool()
    token_norm = mask_B_T.sum().float().clamp_min(1)
    seq_norm = mask_B_T.any(-1).sum().float().clamp_min(1)
    norms = step_norms(cfg, token_norm, seq_norm, torch.tensor(local_step_sums(cfg, [batch]), dtype=torch.float64))
    loss, _ = micro_batch_loss(StudentLM(lm), cfg, batch, norms.token, norms.seq, norms)
    return float(loss.detach())


# Settings that do not change what a run computes (outputs, cadence, how it is spread over devices, the chunk
# size of the LM head, timeouts); everything else must match for a checkpoint to be resumed.
_NOT_IN_RUN_KEY = ({"out", "student", "shards", "steps", "checkpoint_every", "keep_checkpoints", "log_every", "online"}
                   | TrainConfig.EXECUTION_ONLY)


# Method settings whose default (off) is left out of the run key; when set they are part of it.
_OFF_BY_DEFAULT = {"loss_schedule": [], "rows": {}, "methods": MethodsConfig().model_dump(mode="json"),
                   "akl_head_mass": 0.5, "alpha_divergence": 0.2, "kdrl_beta": 5e-3, "kdrl_is_cap": 2.0,
                   "weight_norm": "count"}


def train_run_key(cfg: TrainConfig, student_fingerprint: str, data_fingerprint: str | None) -> str:
    """The run's identity: content fingerprints of the start model and the data (shards, or the online
    teacher and prompts), and the optimisation settings. Paths are provenance only: a moved run resumes."""
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_IN_RUN_KEY}
    for name, off in _OFF_BY_DEFAULT.items():  # unset methods leave the key of a run from before them unchanged
        if settings[name] == off:
            del settings[name]
    gopd = settings.get("methods", {}).get("gopd")
    if gopd is not None:  # the reference model by content (a moved one resumes); the default keeps older keys
        reference = gopd.pop("reference")
        if reference is not None:
            gopd["reference_fingerprint"] = model_fingerprint(reference)
    if cfg.online is not None:
        settings["online"] = {k: v for k, v in cfg.online.model_dump(mode="json").items()
                              if k not in ("teacher", "prompts")}
    return checkpoint.run_fingerprint({"settings": settings, "student": student_fingerprint, "data": data_fingerprint})


class OnlineBatches:
    """The online OPD baseline's data: each call samples fresh rollouts from the current student and has a
    live teacher score them (same record type as the shards, so the same losses apply)."""

    def __init__(self, online: OnlineConfig, student: torch.nn.Module, student_dir: Path, k: int, seed: int,
                 rank: int = 0):
        from pipeline.config import EngineConfig
        from pipeline.engines.hf import HFEngine
        from pipeline.prompts import load_prompts

        self.cfg = online
        self.tokenizer = load_tokenizer(student_dir)
        self.student_engine = HFEngine(str(student_dir), EngineConfig(batch_size=512), model=student)
        self.teacher_engine = HFEngine(str(online.teacher), EngineConfig(batch_size=512))
        self.prompts = load_prompts(online.prompts)
        self.prompt_ids = [encode_prompt(self.tokenizer, p.prompt, online.use_chat_template) for p in self.prompts]
        self.k = k
        self.rng = random.Random(seed + 1_000_003 * rank)  # each data-parallel rank draws its own prompts
        self.sample_seed = online.sampling.seed + 1_000_003 * rank
        self.calls = 0
        self.sample_seconds = 0.0
        self.score_seconds = 0.0

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler is: a resumed run draws the prompts and samples the uninterrupted run would."""
        return {"rng": self.rng.getstate(), "calls": self.calls,
                "sample_seconds": self.sample_seconds, "score_seconds": self.score_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.calls = state["calls"]
        self.sample_seconds, self.score_seconds = state["sample_seconds"], state["score_seconds"]

    def close(self) -> None:
        self.student_engine.close()  # drops the engine's reference only: the student itself is the run's
        self.teacher_engine.close()

    def next_records(self, n: int, parts: int) -> list[TeacherRecord]:
        """``parts`` sampling rounds of ``n / parts`` sequences (fresh prompts each round)."""
        return [r for _ in range(parts) for r in self.next(n // parts)]

    def next(self, n_sequences: int) -> list[TeacherRecord]:
        n_prompts = max(1, n_sequences // self.cfg.sampling.n)
        chosen = [self.rng.randrange(len(self.prompts)) for _ in range(n_prompts)]
        was_training = self.student_engine.model.training
        self.student_engine.model.eval()
        t0 = time.perf_counter()
        gens = self.student_engine.generate([self.prompt_ids[i] for i in chosen],
                                            self.cfg.sampling.model_copy(
                                                update={"seed": self.sample_seed + self.calls}))
        t1 = time.perf_counter()
        self.student_engine.model.train(was_training)
        seqs, starts, meta = [], [], []
        for i, samples in zip(chosen, gens):
            for j, g in enumerate(samples):
                seqs.append(self.prompt_ids[i] + g.response_ids)
                starts.append(len(self.prompt_ids[i]))
                meta.append((i, j, g))
        scored = self.teacher_engine.score(seqs, starts, self.k)
        self.sample_seconds += t1 - t0
        self.score_seconds += time.perf_counter() - t1
        self.calls += 1
        return [TeacherRecord(prompt_id=self.prompts[i].id, sample_index=j,
                              token_ids=np.asarray(seq, dtype=np.int32), prompt_len=start,
                              teacher_logprobs=sc.token_logprobs,
                              behavior_logprobs=np.asarray(g.logprobs, dtype=np.float32),
                              topk_ids=sc.topk_ids, topk_logprobs=sc.topk_logprobs, tail_logprob=sc.tail_logprob,
                              reward=None)
                for (i, j, g), seq, start, sc in zip(meta, seqs, starts, scored)][:n_sequences]


class BatchSource(Protocol):
    """Where a rank's records come from: the shard reader (offline) or the live sampler (online). A source that
    prepares its steps itself (the shard sources given ``pad_id``: split and collated ahead, on the prefetch
    thread) says so with ``prepared = True`` and has ``next_micro_batches(n, parts) -> list[Batch]`` instead;
    ``step_micro_batches`` reads either kind."""

    def next_records(self, n: int, parts: int) -> list[TeacherRecord]:
        """This rank's ``n`` records of the next step (``parts``: the micro-batches they were drawn as)."""

    def state_dict(self) -> dict[str, Any]:
        """The stream position, saved per rank in checkpoints."""

    def close(self) -> None:
        """Stop background decoding and free engines; the run calls it when it ends, on error too."""


def prepare_step(records: list[TeacherRecord], cfg: TrainConfig, pad_id: int,
                 rollouts: RolloutTable | None = None, device_index: int = 0) -> list[Batch]:
    """One step's records as ``train_step`` computes them: micro-batches by count (``grad_accum``) or by the token
    budget (``split_by_token_budget``, packed or padded), each collated and, where CUDA is available, pinned. The
    one code path of both kinds of source: run ahead on the prefetch thread by the shard sources, in the step for
    the others (``step_micro_batches``)."""
    groups = split_by_token_budget([len(r.token_ids) for r in records], cfg.max_tokens_per_micro_batch,
                                   cfg.grad_accum, packed=cfg.packing)
    batches = [collate([records[i] for i in g], pad_id, rollouts) for g in groups]
    if not torch.cuda.is_available():
        return batches
    # the current device is per thread: set it (as DataLoader's pin-memory thread does) so that pinning on the
    # prefetch thread uses this rank's GPU context instead of creating one on GPU 0
    torch.cuda.set_device(device_index)
    return [b.pin_memory() for b in batches]


def step_micro_batches(source: BatchSource, cfg: TrainConfig, n: int, pad_id: int,
                       rollouts: RolloutTable | None = None) -> list[Batch]:
    """The next step's ``n`` records of this rank as micro-batches: as the source prepared them (then the wait is
    only on its queue), or its records through ``prepare_step`` here."""
    if getattr(source, "prepared", False):
        return source.next_micro_batches(n, cfg.grad_accum)  # type: ignore[attr-defined]
    return prepare_step(source.next_records(n, cfg.grad_accum), cfg, pad_id, rollouts,
                        torch.cuda.current_device() if torch.cuda.is_available() else 0)


class _StepStream:
    """What the shard sources share: their stream of ``(records, state)`` steps, each prepared for ``train_step``
    (``prepare_step``) when the source is given ``pad_id``, and produced ``cfg.prefetch_batches`` steps ahead on a
    background thread (``storage.prefetch``) when that is > 0, so decoding, splitting and collating overlap the
    step, which waits (StepMeter's data wait) only on the queue. Each step comes with the state after it: a
    checkpoint holds the position of the last step used, whatever was prepared ahead, and resumes exactly. Without
    ``pad_id`` the steps stay records, read with ``next_records`` (tests, tools looking at the stream)."""

    steps: Iterator[tuple[Any, Any]]
    prepared: bool

    def _start(self, steps: Iterator[tuple[list[TeacherRecord], Any]], cfg: TrainConfig, pad_id: int | None,
               rollouts: RolloutTable | None, device_index: int) -> None:
        self.prepared = pad_id is not None
        if pad_id is not None:
            steps = ((prepare_step(records, cfg, pad_id, rollouts, device_index), state) for records, state in steps)
        self.steps = prefetch(steps, cfg.prefetch_batches) if cfg.prefetch_batches else steps

    def _next(self, prepared: bool) -> tuple[Any, Any]:
        if prepared != self.prepared:
            raise RuntimeError("this source was made " + ("with pad_id: read next_micro_batches" if self.prepared
                                                          else "without pad_id: read next_records"))
        return next(self.steps)

    def close(self) -> None:
        self.steps.close()  # ends the prefetch thread, if any


class ShardBatches(_StepStream):
    """The offline source: this rank's slice of the shuffled, resumable shard stream, one step (``grad_accum``
    reader batches of ``micro`` records) at a time. The top-k columns are read only when a loss of the run
    needs them. Given ``pad_id`` (and the prompt statistics ``rollouts``, if any) it hands out each step split and
    collated (``next_micro_batches``), prepared ahead on the prefetch thread with ``cfg.prefetch_batches`` > 0;
    the state is the reader state after the step (``_StepStream``)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, micro: int, start: ReaderState | None,
                 pad_id: int | None = None, rollouts: RolloutTable | None = None):
        stream = iter_batches(cfg.sources()[0].path, micro, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                              rank=info.rank, world_size=info.world_size, start=start,
                              need_topk=bool(cfg.all_losses() & TOPK_LOSSES))
        self._start(self._steps(stream, cfg.grad_accum), cfg, pad_id, rollouts, info.local_rank)
        self.position: ReaderState | None = start

    @staticmethod
    def _steps(stream: Iterator[tuple[list[TeacherRecord], ReaderState]], parts: int
               ) -> Iterator[tuple[list[TeacherRecord], ReaderState]]:
        while True:
            records: list[TeacherRecord] = []
            for _ in range(parts):
                batch, position = next(stream)
                records.extend(batch)
            yield records, position

    def next_records(self, n: int, parts: int) -> list[TeacherRecord]:
        """The next step's records; ``parts`` x ``micro`` = ``n``, both fixed when the source was made."""
        records, self.position = self._next(prepared=False)
        return records

    def next_micro_batches(self, n: int, parts: int) -> list[Batch]:
        """The next step's micro-batches (``prepare_step`` of its records), when made with ``pad_id``."""
        batches, self.position = self._next(prepared=True)
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {"reader": self.position.to_dict() if self.position is not None else None}


def mixed_draws(weights: list[float], counts: list[int], n: int) -> list[int]:
    """The sources of the next ``n`` records of a weighted mix, given the records drawn from each so far.

        draw m goes to argmax_s ((m + 1) w_s - c_s)      (w normalised to sum 1; ties to the first source)

    with c_s the records source s has had before it: each draw goes to the source furthest behind its share (a
    smooth weighted round robin), so after any m draws every c_s is within one record of m w_s, deterministically
    (a resumed stream continues from the counts alone). ``counts`` is updated in place."""
    total = sum(weights)
    shares = [w / total for w in weights]
    out = []
    for _ in range(n):
        m = sum(counts) + 1
        s = max(range(len(shares)), key=lambda i: (m * shares[i] - counts[i], -i))
        counts[s] += 1
        out.append(s)
    return out


class MixedShardBatches(_StepStream):
    """The offline source over several shard sets (``train.shards`` as a list, e.g. one teacher per domain): each
    step's records are drawn one at a time from the sources by ``mixed_draws`` (exact shares of the weights), each
    source being this rank's slice of its own shuffled, resumable stream (``iter_batches``, one record at a
    time). The state after a step holds each source's reader state and its counts of records and response tokens,
    so a resumed run draws exactly what the uninterrupted one would have; ``metrics`` reports the counts as
    ``source/<name>/records``, ``source/<name>/tokens`` and ``source/<name>/frac`` (share of the records). Given
    ``pad_id`` it hands out each step split and collated, prepared ahead as ``ShardBatches`` does (``_StepStream``)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, micro: int, start: dict[str, Any] | None,
                 pad_id: int | None = None, rollouts: RolloutTable | None = None):
        sources = cfg.sources()
        self.labels = [src.label for src in sources]
        self.weights = [src.weight for src in sources]
        state = start or {"readers": {label: None for label in self.labels},
                          "records": {label: 0 for label in self.labels},
                          "tokens": {label: 0 for label in self.labels}}
        if sorted(state["readers"]) != sorted(self.labels):
            raise LopdUserError(f"cannot resume: the checkpoint mixes sources {sorted(state['readers'])}, this run "
                                f"{sorted(self.labels)}; use a new train.out")
        need_topk = bool(cfg.all_losses() & TOPK_LOSSES)
        streams = [iter_batches(src.path, 1, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, rank=info.rank,
                                world_size=info.world_size, need_topk=need_topk,
                                start=ReaderState.from_dict(r) if (r := state["readers"][src.label]) else None)
                   for src in sources]
        self._start(self._steps(streams, state, micro * cfg.grad_accum), cfg, pad_id, rollouts, info.local_rank)
        self.state = state

    def _steps(self, streams: list[Iterator[tuple[list[TeacherRecord], ReaderState]]], state: dict[str, Any],
               n: int) -> Iterator[tuple[list[TeacherRecord], dict[str, Any]]]:
        readers, records, tokens = dict(state["readers"]), dict(state["records"]), dict(state["tokens"])
        while True:
            counts = [records[label] for label in self.labels]
            batch = []
            for s in mixed_draws(self.weights, counts, n):
                (record,), position = next(streams[s])
                label = self.labels[s]
                readers[label] = position.to_dict()
                records[label] += 1
                tokens[label] += len(record.teacher_logprobs)
                # prompt ids as the merged prompt statistics key them (sets may reuse ids)
                batch.append(dataclasses.replace(record, prompt_id=source_key(label, record.prompt_id)))
            yield batch, {"readers": dict(readers), "records": dict(records), "tokens": dict(tokens)}

    def next_records(self, n: int, parts: int) -> list[TeacherRecord]:
        """The next step's ``n`` records (``micro`` x ``grad_accum``, fixed when the source was made)."""
        records, self.state = self._next(prepared=False)
        return records

    def next_micro_batches(self, n: int, parts: int) -> list[Batch]:
        """The next step's micro-batches (``prepare_step`` of its records), when made with ``pad_id``."""
        batches, self.state = self._next(prepared=True)
        return batches

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def metrics(self, info: DistInfo) -> dict[str, float]:
        """Records and response tokens drawn from each source so far (summed over ranks: call on every rank)."""
        local = [float(self.state[key][label]) for label in self.labels for key in ("records", "tokens")]
        totals = all_reduce_sum(torch.tensor(local, dtype=torch.float64), info).tolist()
        all_records = sum(totals[0::2])
        out: dict[str, float] = {}
        for i, label in enumerate(self.labels):
            out[f"source/{label}/records"] = int(totals[2 * i])
            out[f"source/{label}/tokens"] = int(totals[2 * i + 1])
            out[f"source/{label}/frac"] = round(totals[2 * i] / max(all_records, 1), 6)
        return out


EvalHook = Callable[[torch.nn.Module], dict[str, float]]


def run_train(cfg: TrainConfig, show_progress: bool = True, eval_hook: EvalHook | None = None,
              eval_every: int | None = None, stop_after: int | None = None) -> StageResult:
    """Offline OPD: train ``cfg.steps`` optimiser steps on the teacher shards ``cfg.shards`` (resuming from
    ``cfg.out/ckpt`` if present). ``cfg.online`` is not read here (see ``run_online_train``).

    ``eval_hook`` (the demo's accuracy probe) runs every ``eval_every`` steps; its time is excluded from
    ``perf/train_seconds``. ``stop_after`` ends the process's work early (tests use it to simulate a kill).
    """
    require_model_dir(cfg.student, field="train.student", made_by="lopd sft")
    sources = cfg.sources()
    several = len(sources) > 1
    sets = {src.label: require_shard_set(src.path, kind="teacher_topk", made_by="lopd teacher-logprobs",
                                         field=f"train.shards[{src.label}]" if several else "train.shards")
            for src in sources}
    needed_topk = cfg.all_losses() & TOPK_LOSSES
    relations = {}
    for label, shards in sets.items():
        where = f"train.shards source {label!r} ({shards.root})" if several else str(shards.root)
        if needed_topk and not shards.metadata.get("k"):
            raise LopdUserError(f"{where}: losses {sorted(needed_topk)} need top-k shards (these store k=0: the "
                                "sampled token's log-prob only); use the `lightning` loss or extract with k > 0")
        relations[label] = check_shard_teacher(shards.metadata, where)
    metas = {label: shards.metadata for label, shards in sets.items()}
    provenance = {"opd_teacher_fingerprint": None, "teacher_mismatch_allowed": None, "self_distillation": None}
    if not several:
        (label, shards), = sets.items()
        data_fingerprint = shard_data_fingerprint(shards.manifest)
        provenance = {"opd_teacher_fingerprint": shards.metadata.get("teacher_fingerprint"),
                      "teacher_mismatch_allowed": shards.metadata.get("teacher_mismatch_allowed"),
                      "self_distillation": relations[label] == "self_distillation"}
        rollouts = rollout_table(cfg, shards, data_fingerprint)
    else:
        check_sources_agree(cfg, sets, bool(needed_topk))
        data_fingerprint = checkpoint.run_fingerprint({"sources": [
            {"name": src.label, "weight": src.weight, "data": shard_data_fingerprint(sets[src.label].manifest)}
            for src in sources]})
        provenance["sources"] = {src.label: {
            "weight": src.weight, "teacher_fingerprint": metas[src.label].get("teacher_fingerprint"),
            "teacher_relation": relations[src.label]} for src in sources}
        rollouts = mixed_rollout_table(cfg, sets)
    return _train(cfg, "offline", data_fingerprint, metas, provenance, show_progress, eval_hook, eval_every,
                  stop_after, rollouts=rollouts)


def check_sources_agree(cfg: TrainConfig, sets: dict[str, ShardSet], need_topk: bool) -> None:
    """Several shard sets can share a step only if their records collate and their ids index one vocabulary: the
    same vocabulary size (each set's extraction checked its teacher's vocabulary against its rollouts' student),
    one k when a loss reads the top-k."""
    vocab = {label: s.metadata.get("vocab_size") for label, s in sets.items()}
    if len(set(vocab.values())) > 1:
        raise LopdUserError(f"train.shards: the sources index vocabularies of different sizes {vocab}; token ids "
                            "of one would not be the student's in another: mix sets of one model family")
    ks = {label: s.metadata.get("k") for label, s in sets.items()}
    if need_topk and len(set(ks.values())) > 1:
        raise LopdUserError(f"train.shards: the top-k losses need one k over the sources, got {ks}; extract them "
                            "with the same teacher_logprobs.k or train with the `lightning` loss")


def rollout_table(cfg: TrainConfig, shards: ShardSet, data_fingerprint: str) -> RolloutTable | None:
    """The shard set's prompt statistics when a method or a routing reads them (computed once, stored beside
    the shards as ``prompt_stats.parquet``, reused while the set is unchanged); None otherwise. Refused when a
    reward is missing, or when a prompt has fewer than 2 rollouts and a method compares a prompt's rollouts."""
    if not cfg.needs_prompt_stats():
        return None
    table, how = load_prompt_stats(shards, data_fingerprint)
    routed = [name for name in sorted(cfg.all_losses()) if cfg.route(name) != "all"]
    users = ([f"train.rows.{name}={cfg.route(name)}" if name in cfg.rows else f"{name} (on {cfg.route(name)} rows)"
              for name in routed]
             + [f"train.methods.{name}" for name in ("paced", "scope") if getattr(cfg.methods, name) is not None]
             + (["the kdrl loss (group-normalised rewards)"] if "kdrl" in cfg.all_losses() else []))
    group_users = [u for u in users if "solved" in u or u.endswith(("paced", "scope", "rewards)"))]
    require_group_stats(table, shards.root, groups=bool(group_users), why=", ".join(group_users or users))
    log.info("train: prompt statistics of %s: %s", shards.root, how)
    scope = cfg.methods.scope
    return RolloutTable.from_table(table, None if scope is None else (scope.tau, scope.student_ppl_sign))


def mixed_rollout_table(cfg: TrainConfig, sets: dict[str, ShardSet]) -> RolloutTable | None:
    """Several shard sets' prompt statistics (``rollout_table`` of each, computed and stored beside it, refused
    naming its directory) as one table keyed as ``MixedShardBatches`` tags its records: a prompt's group is never
    spread over sets, and sets may reuse prompt ids. None when no method reads them."""
    if not cfg.needs_prompt_stats():
        return None
    return RolloutTable.merge({label: rollout_table(cfg, shards, shard_data_fingerprint(shards.manifest))
                               for label, shards in sets.items()})


def run_online_train(cfg: TrainConfig, show_progress: bool = True, eval_hook: EvalHook | None = None,
                     eval_every: int | None = None, stop_after: int | None = None) -> StageResult:
    """The online OPD baseline: each step the current student samples fresh rollouts and the live teacher
    ``cfg.online.teacher`` scores them; same losses, loop and checkpoints as ``run_train``."""
    if cfg.online is None:
        raise LopdUserError("online OPD needs a train.online section (teacher, prompts) in the run config")
    if cfg.needs_prompt_stats():
        raise LopdUserError("row routing (train.rows, the anchors), train.methods.paced, train.methods.scope and "
                            "the kdrl loss read the prompt statistics of a shard set: offline training only "
                            "(`lopd train`), not the online baseline")
    require_model_dir(cfg.student, field="train.student", made_by="lopd sft")
    require_model_dir(cfg.online.teacher, field="train.online.teacher")
    data = {"teacher": model_fingerprint(cfg.online.teacher), "prompts": file_sha256(Path(cfg.online.prompts))}
    return _train(cfg, "online", checkpoint.run_fingerprint(data), {},
                  {"opd_teacher_fingerprint": None, "teacher_mismatch_allowed": None}, show_progress, eval_hook,
                  eval_every, stop_after)


def _train(cfg: TrainConfig, mode: str, data_fingerprint: str, shard_metas: dict[str, dict[str, Any]],
           teacher_provenance: dict[str, Any], show_progress: bool, eval_hook: EvalHook | None,
           eval_every: int | None, stop_after: int | None, rollouts: RolloutTable | None = None) -> StageResult:
    out = Path(cfg.out)
    ckpt_root, final_dir = out / "ckpt", out / "final"
    if gopd_reference_needed(cfg):
        require_model_dir(gopd_reference_path(cfg), field="train.methods.gopd.reference")
    student_fp = model_fingerprint(cfg.student)
    run_key = train_run_key(cfg, student_fp, data_fingerprint)
    if (final_dir / "lopd_provenance.json").exists():
        done = read_provenance(final_dir)
        if done.get("train_run_key") == run_key and done.get("steps") == cfg.steps:
            log.info("train: %s is complete (same config, %d steps); nothing to do", final_dir, cfg.steps)
            return StageResult("train", out, skipped=True, summary={"final_model": str(final_dir)})
    for label, meta in shard_metas.items():
        if meta.get("student_fingerprint") not in (None, student_fp):
            log.warning("train: shards %s were sampled from student %s but training starts from %s; the rollouts "
                        "are then off-policy for this student", label, meta.get("student_fingerprint"), student_fp)

    # --- set-up and resume
    info = setup_distributed(cfg.dist_timeout_minutes)
    device = device_for(info)
    local = cfg.batch_size // info.world_size
    micro = local // cfg.grad_accum
    if micro < 1 or micro * cfg.grad_accum * info.world_size != cfg.batch_size:
        raise LopdUserError(f"train.batch_size={cfg.batch_size} must be a multiple of grad_accum × world size "
                         f"= {cfg.grad_accum} × {info.world_size}")
    seed_everything(cfg.seed, cfg.deterministic)
    tokenizer = load_tokenizer(cfg.student)
    lm = load_student(cfg.student, info, fsdp=cfg.fsdp, attn_implementation=cfg.attn_implementation)
    model = prepare_student(lm, info, fsdp=cfg.fsdp, precision=cfg.precision,
                            activation_checkpointing=cfg.activation_checkpointing, fsdp_shard_size=cfg.fsdp_shard_size)
    model.train()
    reference = None
    if gopd_reference_needed(cfg):
        reference = prepare_reference(gopd_reference_path(cfg), info, fsdp=cfg.fsdp, precision=cfg.precision,
                                      attn_implementation=cfg.attn_implementation)
        log.info("train: G-OPD reference policy (frozen) %s", gopd_reference_path(cfg))
    opt = make_optimizer(model, cfg.optim)
    sched = make_scheduler(opt, cfg.optim, cfg.steps)
    meter = StepMeter(count_flop_params(unwrap(model)), info.world_size,
                      cfg.peak_tflops or detect_peak_tflops(device, cfg.precision))
    resumed = checkpoint.load_latest(ckpt_root, model=model, optimizer=opt, scheduler=sched, run_key=run_key,
                                     rank=info.rank, what="training")
    start_step, rank_state = 0, None
    if resumed is not None:
        if resumed.world_size != info.world_size:
            # each rank's stream position is saved; another world size would see other sequences
            raise LopdUserError(f"{ckpt_root}: checkpoint was written by {resumed.world_size} process(es), this run "
                                f"has {info.world_size}; resume with --nproc-per-node {resumed.world_size} or use a "
                                "new train.out")
        start_step, rank_state = resumed.step, resumed.rank_state
        checkpoint.set_rng_state(rank_state["rng"])
        meter.load_state_dict(resumed.trainer["meter"])
        log.info("train: resuming from %s at step %d", ckpt_root / f"step-{start_step:06d}", start_step)

    source: BatchSource
    if mode == "offline":
        saved = rank_state["source"] if rank_state else None
        if len(cfg.sources()) > 1:
            source = MixedShardBatches(cfg, info, micro, saved, tokenizer.pad_token_id, rollouts)
        else:
            source = ShardBatches(cfg, info, micro, ReaderState.from_dict(saved["reader"])
                                  if saved and saved["reader"] else None, tokenizer.pad_token_id, rollouts)
    else:
        source = OnlineBatches(cfg.online, unwrap(model), cfg.student, cfg.online.k, cfg.seed, rank=info.rank)
        if rank_state:
            source.load_state_dict(rank_state["source"])

    # --- the loop: step, logging, checkpointing
    metrics = MetricsWriter(out / "metrics.jsonl", enabled=info.is_main, resume_step=start_step)
    pad_id = tokenizer.pad_token_id
    last: dict[str, Any] = {}
    if eval_hook and start_step == 0 and eval_every and info.is_main:
        metrics.write({"step": 0, "perf/train_seconds": 0.0, **eval_hook(unwrap(model))})
    with contextlib.closing(source), progress_bar(not (show_progress and info.is_main)) as bar:
        task = bar.add_task(f"train ({mode} OPD)", total=cfg.steps, completed=start_step, rate="")
        for step in range(start_step + 1, cfg.steps + 1):
            step_cfg = cfg.model_copy(update={"losses": cfg.losses_at(step)}) if cfg.loss_schedule else cfg
            parts, grad_norm = train_step(model, opt, step_cfg, source, local, pad_id, info, device, meter, rollouts,
                                          reference)
            sched.step()
            if step % cfg.log_every == 0 or step == cfg.steps:
                last = {"step": step, **{k: round(float(v), 6) for k, v in parts.items()},
                        "optim/lr": sched.get_last_lr()[0], "optim/grad_norm": grad_norm,
                        "progress/tokens": meter.tokens, "perf/train_seconds": round(meter.seconds, 3),
                        **meter.metrics(device)}
                if isinstance(source, MixedShardBatches):
                    last.update(source.metrics(info))
                if isinstance(source, OnlineBatches):
                    last.update({"perf/sample_seconds": round(source.sample_seconds, 3),
                                 "perf/score_seconds": round(source.score_seconds, 3)})
                if eval_hook and eval_every and step % eval_every == 0 and info.is_main:
                    last.update(eval_hook(unwrap(model)))
                    model.train()
                metrics.write(last)
                bar.update(task, rate=f"loss {last.get('loss/total', float('nan')):.4f}")
            bar.update(task, advance=1)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint.save(ckpt_root, step, model=model, optimizer=opt, scheduler=sched, run_key=run_key,
                                trainer={"meter": meter.state_dict()},
                                rank_state={"rng": checkpoint.rng_state(), "source": source.state_dict()},
                                rank=info.rank, world_size=info.world_size, keep_last=cfg.keep_checkpoints)
            if stop_after is not None and step >= stop_after:
                return StageResult("train", out, summary={"stopped_at": step})

    provenance = {**read_provenance(cfg.student), "stage": "train", "train_run_key": run_key, "steps": cfg.steps,
                  **teacher_provenance, "online": mode == "online"}
    save_trained_model(model, cfg.fsdp, info, cfg.student, tokenizer, final_dir, provenance)
    if info.is_main:
        # titled by the losses, so a top-k run is never read as the published Lightning loss
        plot_metrics(out / "metrics.jsonl", out / "curves.png",
                     title=f"{mode} OPD: {' + '.join(name for name, w in cfg.losses.items() if w)}")
    if info.world_size > 1:
        torch.distributed.barrier()
    log.info("train: %d steps, %.1fs of training, %d tokens -> %s", cfg.steps, meter.seconds, meter.tokens, final_dir)
    return StageResult("train", out, wall_seconds=meter.seconds,
                       summary={"final_model": str(final_dir), "train_seconds": meter.seconds, "last": last})


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, source: BatchSource,
               local: int, pad_id: int, info: DistInfo, device: torch.device, meter: StepMeter,
               rollouts: RolloutTable | None = None, reference: torch.nn.Module | None = None
               ) -> tuple[Metrics, float]:
    """One optimiser step: this rank's ``local`` records in micro-batches (by count, or by the token budget),
    each normalised by the step's global token / sequence counts (and routed counts, see ``StepNorms``),
    gradients accumulated, clipped, applied. ``rollouts``: the prompt statistics, when a method reads them;
    ``reference``: G-OPD's frozen reference model, when its top-k form is on."""
    t0 = time.perf_counter()
    micro_batches = step_micro_batches(source, cfg, local, pad_id, rollouts)  # the shard sources: prepared ahead
    meter.data_seconds += time.perf_counter() - t0
    local_counts = [sum(int(b.mask_B_T.sum()) for b in micro_batches),
                    sum(int(b.mask_B_T.any(-1).sum()) for b in micro_batches),
                    sum(int(b.attention_B_L.sum()) for b in micro_batches)]
    counts = all_reduce_sum(torch.tensor(local_counts + local_step_sums(cfg, micro_batches), dtype=torch.float64),
                            info)
    token_norm = counts[0].clamp_min(1).float().to(device)
    seq_norm = counts[1].clamp_min(1).float().to(device)
    norms = step_norms(cfg, token_norm, seq_norm, counts[3:].to(device))
    fsdp_sharded = cfg.fsdp and info.world_size > 1
    opt.zero_grad(set_to_none=True)
    parts: list[tuple[int, Metrics]] = []
    for mb in micro_batches:
        meter.count_positions(mb.attention_B_L, cfg.packing)
        mb = mb.to(device, non_blocking=True)  # asynchronous from pinned memory (prepare_step on CUDA)
        with autocast_context(cfg.precision, device, fsdp_sharded):
            loss, mb_metrics = micro_batch_loss(model, cfg, mb, norms.token, norms.seq, norms, reference)
        # DDP/FSDP average gradients over ranks; the loss is already divided by the global count.
        (loss * info.world_size).backward()
        parts.append((int(mb.mask_B_T.sum()), mb_metrics))
    merged = merge_chunk_metrics(parts)
    losses = [k for k in merged if k.startswith("loss/")]  # each rank holds its share of the step loss
    if losses and info.world_size > 1:
        summed = all_reduce_sum(torch.stack([merged[k].double().cpu() for k in losses]), info)
        merged.update(dict(zip(losses, summed)))
    grad_norm = (float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))
                 if cfg.optim.grad_clip else float("nan"))
    opt.step()
    meter.tokens += int(counts[0])
    meter.model_tokens += int(counts[2])
    meter.seconds += time.perf_counter() - t0
    return merged, grad_norm
