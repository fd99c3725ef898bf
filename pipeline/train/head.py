"""The student's LM head without B x T x V logits: per-token quantities the losses read, computed chunk by chunk.

A distillation loss never needs the whole logit tensor. It needs, per response token, the log-prob of the
sampled token, the log-probs at the teacher's top-k ids, the log-mass outside them, sometimes the entropy.
At vocab 151,936 and 8k tokens the fp32 logits alone are 5 GB per sequence, so ``fused_head_loss`` takes the
final hidden states of the selected tokens, applies the LM head to ``chunk_tokens`` of them at a time,
computes the loss of that chunk and its gradient with respect to the chunk's logits at once (every lopd loss
is a sum over tokens divided by a global count fixed before the step, so a chunk's gradient does not depend
on the other chunks), turns it into gradients of the hidden states and the head weight, and frees the chunk.
Peak memory is one chunk's logits and their gradient, whatever the sequence length; the matmul work equals
the full path's (one forward and two backward products per token), nothing is recomputed. The same idea as
Liger-Kernel's fused linear cross entropy and torchtune's chunked KD losses, with lopd's losses plugged in.

Shape key: N selected tokens (flattened over the micro-batch), H hidden size, V vocabulary, K teacher top-k.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Callable, Protocol

import torch

Metrics = dict[str, torch.Tensor]

# The student's tail is floored here (exp() is exactly 0 in every float dtype); reached only when the
# teacher's top-k covers the whole vocabulary.
LOG_ZERO = -1.0e4


@dataclass
class TokenStats:
    """What the losses read of the student, per token (all float32 or float64, ``[..., ]`` leading shape).

    target_logprobs: log p_S(y_t) of the sampled / target token.
    topk_logprobs:   log p_S at the teacher's top-k ids, ``[..., K]`` (None when no loss needs them).
    tail_logprob:    log(1 - sum_k p_S(k)), the student's mass outside those ids (None with topk_logprobs).
    entropy:         H(p_S) over the full vocabulary (None unless asked for).
    argmax_ids:      the student's most likely token (no gradient; None unless asked for).
    """

    target_logprobs: torch.Tensor
    topk_logprobs: torch.Tensor | None = None
    tail_logprob: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    argmax_ids: torch.Tensor | None = None

    def __getitem__(self, index) -> "TokenStats":
        return TokenStats(*(None if (v := getattr(self, f.name)) is None else v[index] for f in fields(self)))


def token_stats(logits_V: torch.Tensor, target_ids: torch.Tensor, topk_ids_K: torch.Tensor | None = None, *,
                entropy: bool = False, argmax: bool = False) -> TokenStats:
    """The student's per-token quantities from full logits ``[..., V]`` (bf16/fp16 are upcast to fp32).

        target_logprobs = z[y] - logsumexp(z)
        topk_logprobs_k = z[id_k] - logsumexp(z)
        tail_logprob    = logsumexp(z without the top-k ids) - logsumexp(z)   (exact when the tail is tiny;
                          floored at LOG_ZERO, which only K = V reaches)
        entropy         = logsumexp(z) - sum_v p_v z_v

    The reference for ``fused_head_loss`` (it runs this on each chunk) and the float64 path of the tests.
    Ids must be valid vocabulary indices everywhere (callers replace padding first).
    """
    logits_V = logits_V.to(torch.promote_types(logits_V.dtype, torch.float32))
    log_z = logits_V.logsumexp(-1)
    target = logits_V.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1) - log_z
    topk = tail = ent = top1 = None
    if topk_ids_K is not None:
        topk = logits_V.gather(-1, topk_ids_K) - log_z.unsqueeze(-1)
        in_topk_V = torch.zeros_like(logits_V, dtype=torch.bool).scatter_(-1, topk_ids_K, True)
        # finfo.min rather than -inf: with every id masked (K = V) logsumexp stays finite, forward and backward.
        rest = logits_V.masked_fill(in_topk_V, torch.finfo(logits_V.dtype).min).logsumexp(-1)
        tail = (rest - log_z).clamp_min(LOG_ZERO)
    if entropy:
        ent = log_z - (logits_V.softmax(-1) * logits_V).sum(-1)
    if argmax:
        top1 = logits_V.detach().argmax(-1)
    return TokenStats(target, topk, tail, ent, top1)


# Logits one chunk may hold by default: 2^25 (128 MB in fp32), 220 tokens at vocab 151,936, about the chunk
# Liger-Kernel's rule (2^ceil(log2(N / ceil(V / H)))) picks for 8k tokens at hidden 4,096 (256). A small
# vocabulary gets one chunk of up to 8,192 tokens (fewer, larger matmuls; no per-chunk overhead on tiny models).
DEFAULT_CHUNK_LOGITS = 2**25


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per LM-head chunk when none is configured: ``DEFAULT_CHUNK_LOGITS / V``, within [64, 8192]."""
    return max(64, min(8192, DEFAULT_CHUNK_LOGITS // vocab_size))


# A chunk's loss: given the chunk's stats and its token range [start, end), return (loss, metrics). The loss
# must be this chunk's share of the step loss (a sum over its tokens / a global count).
ChunkLoss = Callable[[TokenStats, int, int], tuple[torch.Tensor, Metrics]]


class HeadPrepass(Protocol):
    """A no-grad pass over every chunk before the loss pass, for a loss that needs all tokens' statistics first
    (e.g. a top-fraction token selection). ``fused_head_loss`` calls ``chunk`` on each chunk's stats (entropy
    included when ``entropy`` is set), then ``done`` once, then runs the loss pass: over every token when ``done``
    returns None, else over the tokens it returns (indices into N, increasing), the loss function then seeing
    them renumbered 0 .. n-1; the others get no logits and no gradient."""

    entropy: bool

    def chunk(self, stats: TokenStats, start: int, end: int) -> None: ...

    def done(self) -> torch.Tensor | None: ...


def head_dtypes(hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """``(matmul dtype, stats dtype)`` of the chunked head: the autocast dtype when autocast is on (bf16 mixed
    precision), else the weight's; then ``stats_dtype`` of it."""
    device_type = hidden_N_H.device.type
    mm_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight_V_H.dtype
    return mm_dtype, stats_dtype(mm_dtype)


def stats_dtype(mm_dtype: torch.dtype) -> torch.dtype:
    """Softmax math, loss and weight-gradient accumulation: float32, float64 for float64 matmuls."""
    return torch.float64 if mm_dtype == torch.float64 else torch.float32


def iter_chunk_stats(hidden_N_H: torch.Tensor, weight: torch.Tensor, target_ids_N: torch.Tensor,
                     topk_ids_N_K: torch.Tensor | None, chunk_tokens: int, mm_dtype: torch.dtype,
                     acc_dtype: torch.dtype, *, entropy: bool = False) -> Iterator[tuple[int, int, TokenStats]]:
    """``(start, end, token_stats(hidden[start:end] @ weight.T))`` chunk by chunk, without gradient and with one
    chunk's logits alive at a time (``weight`` already in ``mm_dtype``; call with autocast off)."""
    for start in range(0, hidden_N_H.shape[0], chunk_tokens):
        end = min(hidden_N_H.shape[0], start + chunk_tokens)
        with torch.no_grad():
            logits_n_V = (hidden_N_H[start:end].detach().to(mm_dtype) @ weight.T).to(acc_dtype)
            stats = token_stats(logits_n_V, target_ids_N[start:end],
                                None if topk_ids_N_K is None else topk_ids_N_K[start:end], entropy=entropy)
        del logits_n_V
        yield start, end, stats


@torch.no_grad()
def chunked_token_stats(hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, target_ids_N: torch.Tensor, *,
                        topk_ids_N_K: torch.Tensor | None = None, chunk_tokens: int | None = None) -> TokenStats:
    """``token_stats(hidden @ weight.T)`` without gradient, ``chunk_tokens`` tokens of logits at a time (default
    ``default_chunk_tokens(V)``): a frozen model's per-token log-probs (G-OPD's reference policy) at the peak
    memory of one chunk, in the head's dtypes (``head_dtypes``)."""
    mm_dtype, acc_dtype = head_dtypes(hidden_N_H, weight_V_H)
    with torch.autocast(hidden_N_H.device.type, enabled=False):
        parts = [stats for _, _, stats in iter_chunk_stats(
            hidden_N_H, weight_V_H.to(mm_dtype), target_ids_N, topk_ids_N_K,
            chunk_tokens or default_chunk_tokens(weight_V_H.shape[0]), mm_dtype, acc_dtype)]
    if not parts:
        empty = torch.zeros(0, dtype=acc_dtype, device=hidden_N_H.device)
        return TokenStats(empty, None if topk_ids_N_K is None else empty.reshape(0, topk_ids_N_K.shape[-1]),
                          None if topk_ids_N_K is None else empty)
    return TokenStats(*(None if getattr(parts[0], f.name) is None else torch.cat([getattr(p, f.name) for p in parts])
                        for f in fields(TokenStats)))


def merge_chunk_metrics(parts: list[tuple[int, Metrics]]) -> Metrics:
    """Combine per-chunk (or per-micro-batch) metrics: ``loss/*`` are shares of one loss (summed), ``*_max`` take
    the max, every other key is a mean over the parts' tokens (weighted by each part's token count). Every key of
    any part is kept; a part with no tokens adds its loss share (0) but no statistic (its means and maxima are of
    nothing), and a key seen only in parts without tokens reads 0."""
    total = sum(n for n, _ in parts)
    merged: Metrics = {}
    for key in dict.fromkeys(k for _, m in parts for k in m):
        values = [(n, m[key].detach().float()) for n, m in parts if key in m]
        if key.startswith("loss/"):
            merged[key] = torch.stack([v for _, v in values]).sum()
            continue
        counted = [(n, v) for n, v in values if n > 0]
        if not counted:
            merged[key] = torch.zeros_like(values[0][1])
        elif key.endswith("_max"):
            merged[key] = torch.stack([v for _, v in counted]).max()
        else:
            merged[key] = sum(n * v for n, v in counted) / total
    return merged


_FUSED_ADDMM: dict[str, bool] = {}  # device type -> whether this torch's addmm takes out_dtype there


def fused_addmm_supported(device: torch.device) -> bool:
    """Whether ``torch.addmm(..., out_dtype=torch.float32)`` runs on ``device`` with bf16 inputs (torch 2.11 and 2.13
    on CUDA: yes; the older releases pyproject admits: no keyword): probed once per device type on a 1 x 1 product."""
    if device.type not in _FUSED_ADDMM:
        one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
        try:
            torch.addmm(torch.zeros(1, 1, device=device), one, one, out_dtype=torch.float32)
            _FUSED_ADDMM[device.type] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _FUSED_ADDMM[device.type] = False
    return _FUSED_ADDMM[device.type]


def accumulate_weight_grad(grad_weight_V_H: torch.Tensor, g_n_V: torch.Tensor, h_n_H: torch.Tensor, *,
                           fused: bool) -> None:
    """grad_weight_V_H += g_n_V.T @ h_n_H, in place, ``grad_weight_V_H`` in float32 (float64 with float64 inputs).

    With bf16 inputs the product must not be formed in bf16 and then added: that writes a V x H bf16 temporary and
    an fp32 copy of it per chunk (about 12 GB of memory traffic per 220-token chunk at vocab 151,936, hidden 4,096).
    ``fused`` (CUDA): one ``addmm`` that reads bf16 and accumulates into the fp32 gradient (``out_dtype``, as
    Liger-Kernel's fused linear cross entropy does) where this torch has it (``fused_addmm_supported``); the CPU has
    no such kernel: the two-step form there."""
    if g_n_V.dtype == grad_weight_V_H.dtype:
        grad_weight_V_H.addmm_(g_n_V.T, h_n_H)
    elif fused and fused_addmm_supported(grad_weight_V_H.device):
        torch.addmm(grad_weight_V_H, g_n_V.T, h_n_H, out_dtype=grad_weight_V_H.dtype, out=grad_weight_V_H)
    else:
        grad_weight_V_H += (g_n_V.T @ h_n_H).to(grad_weight_V_H.dtype)


class _FusedHeadLoss(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, target_ids_N: torch.Tensor,
                topk_ids_N_K: torch.Tensor | None, loss_fn: ChunkLoss, chunk_tokens: int, entropy: bool,
                argmax: bool, mm_dtype: torch.dtype, out_metrics: Metrics,
                prepass: HeadPrepass | None = None) -> torch.Tensor:
        weight = weight_V_H.detach().to(mm_dtype)
        grad_hidden_N_H = torch.zeros_like(hidden_N_H)
        acc_dtype = stats_dtype(mm_dtype)
        grad_weight_V_H = torch.zeros(weight_V_H.shape, dtype=acc_dtype, device=weight_V_H.device)
        loss = torch.zeros((), dtype=acc_dtype, device=hidden_N_H.device)
        parts: list[tuple[int, Metrics]] = []
        grad_rows_N = None  # where the loss pass's tokens sit in N (None: all of them, in order)
        device_type = hidden_N_H.device.type
        with torch.autocast(device_type, enabled=False):  # dtypes are explicit here
            if prepass is not None:  # one more head matmul per token, no gradient, one chunk of logits at a time
                for start, end, stats in iter_chunk_stats(hidden_N_H, weight, target_ids_N, topk_ids_N_K,
                                                          chunk_tokens, mm_dtype, acc_dtype, entropy=prepass.entropy):
                    prepass.chunk(stats, start, end)
                keep_n = prepass.done()
                if keep_n is not None:  # the loss pass reads only these tokens: fewer logits, less work
                    hidden_N_H, target_ids_N = hidden_N_H.detach()[keep_n], target_ids_N[keep_n]
                    topk_ids_N_K = None if topk_ids_N_K is None else topk_ids_N_K[keep_n]
                    grad_rows_N = keep_n
            # no token (an empty response, an idle copy): one empty chunk, so the loss runs and returns its metric
            # keys (every rank then reduces the same keys) with a zero loss and zero gradients
            for start in range(0, max(hidden_N_H.shape[0], 1), chunk_tokens):
                end = min(hidden_N_H.shape[0], start + chunk_tokens)
                h_n_H = hidden_N_H[start:end].detach().to(mm_dtype)
                with torch.enable_grad():
                    logits_n_V = (h_n_H @ weight.T).to(acc_dtype).detach().requires_grad_(True)
                    stats = token_stats(logits_n_V, target_ids_N[start:end],
                                        None if topk_ids_N_K is None else topk_ids_N_K[start:end],
                                        entropy=entropy, argmax=argmax)
                    chunk_loss, metrics = loss_fn(stats, start, end)
                    (grad_logits_n_V,) = torch.autograd.grad(chunk_loss, logits_n_V, allow_unused=True)
                loss += chunk_loss.detach().to(loss.dtype)
                parts.append((end - start, metrics))
                if grad_logits_n_V is None:  # this chunk does not move the loss (e.g. zero weights)
                    continue
                g_n_V = grad_logits_n_V.to(mm_dtype)
                del logits_n_V, stats, chunk_loss, grad_logits_n_V
                rows = slice(start, end) if grad_rows_N is None else grad_rows_N[start:end]
                grad_hidden_N_H[rows] = (g_n_V @ weight).to(grad_hidden_N_H.dtype)
                accumulate_weight_grad(grad_weight_V_H, g_n_V, h_n_H, fused=grad_weight_V_H.is_cuda)
        out_metrics.update(merge_chunk_metrics(parts))
        # Intermediate results, not inputs or outputs: kept on ctx and scaled in place in backward, so the
        # V x H weight gradient exists once (autograd then accumulates it like any other gradient).
        ctx.grads = (grad_hidden_N_H, grad_weight_V_H.to(weight_V_H.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden_N_H, grad_weight_V_H = ctx.grads
        del ctx.grads  # one backward per forward (no retain_graph through the head)
        grad_hidden_N_H.mul_(grad_loss.to(grad_hidden_N_H.dtype))
        grad_weight_V_H.mul_(grad_loss.to(grad_weight_V_H.dtype))
        return grad_hidden_N_H, grad_weight_V_H, None, None, None, None, None, None, None, None, None


def fused_head_loss(hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, target_ids_N: torch.Tensor,
                    loss_fn: ChunkLoss, *, topk_ids_N_K: torch.Tensor | None = None,
                    chunk_tokens: int | None = None, entropy: bool = False,
                    argmax: bool = False, prepass: HeadPrepass | None = None) -> tuple[torch.Tensor, Metrics]:
    """loss = sum over chunks of ``loss_fn(token_stats(hidden[chunk] @ weight.T), start, end)``, never holding
    more than ``chunk_tokens`` x V logits (default: ``default_chunk_tokens(V)``).

    Gradients flow to ``hidden_N_H`` and ``weight_V_H`` (tied embeddings included). The logits are computed in
    the autocast dtype when autocast is on (bf16 mixed precision), else in the weight's dtype (bf16 params
    under FSDP2 mixed precision, fp32 on CPU); softmax math is always fp32 or wider, the weight gradient is
    accumulated in fp32. In fp32 and fp64 it equals ``loss_fn`` on the full logits up to summation order.
    ``prepass`` (``HeadPrepass``): a no-grad pass over all chunks before the loss pass, at the cost of one more
    chunk x vocab matmul per token (a third more head work: it does three) and the same peak memory; when it
    selects tokens, the loss pass runs on those only.
    """
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight_V_H.shape[0])
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    mm_dtype, _ = head_dtypes(hidden_N_H, weight_V_H)
    metrics: Metrics = {}
    loss = _FusedHeadLoss.apply(hidden_N_H, weight_V_H, target_ids_N, topk_ids_N_K, loss_fn, chunk_tokens,
                                entropy, argmax, mm_dtype, metrics, prepass)
    return loss, metrics
