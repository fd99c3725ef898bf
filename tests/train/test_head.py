"""pipeline/train/head.py: the chunked LM head equals the full-logit path (loss and gradients, every loss, tied
embeddings), and a pre-pass selection runs the loss on the kept tokens only."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import TOPK_LOSSES
from pipeline.train.batching import TokenTargets
from pipeline.train.head import fused_head_loss, token_stats
from pipeline.train.objective import compute_losses
from tests.train.helpers import NAMED_LOSS_SETS, named_loss_cfg


def _case(N=37, H=8, V=23, K=5, rows=(9, 1, 20, 7), seed=0, dtype=torch.float64):
    """Hidden states of N selected tokens in 4 rows, an LM head, the teacher's top-k (the last vocab row among
    the ids) with tail mass, sampled tokens, behaviour log-probs."""
    assert sum(rows) == N
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / H**0.5
    teacher = (2 * torch.randn(N, V, generator=g, dtype=dtype)).log_softmax(-1)
    topk_lp, topk_ids = teacher.topk(K, -1)
    topk_ids[::3, 0] = V - 1  # the last vocabulary row is an id like any other
    topk_lp = teacher.gather(-1, topk_ids)
    outside = torch.ones_like(teacher, dtype=torch.bool).scatter_(-1, topk_ids, False)
    tail = teacher.masked_fill(~outside, -float("inf")).logsumexp(-1)
    targets = torch.randint(0, V, (N,), generator=g)
    row_len = torch.repeat_interleave(torch.tensor(rows), torch.tensor(rows)).to(dtype)
    tt = TokenTargets(teacher.gather(-1, targets[:, None])[:, 0], teacher.gather(-1, targets[:, None])[:, 0] - 0.3,
                      topk_ids, topk_lp, tail, 1.0 / row_len)
    return hidden, weight, targets, tt, len(rows)


def _full_path(cfg, hidden, weight, targets, tt, n_rows):
    """The reference: full logits, stats over all tokens at once, one loss call."""
    need_topk = bool(set(cfg.losses) & TOPK_LOSSES)
    stats = token_stats(hidden @ weight.T, targets, tt.topk_ids_N_K if need_topk else None)
    ones = torch.ones(1, len(targets), dtype=torch.bool)
    norm_tok, norm_seq = torch.tensor(float(len(targets))), torch.tensor(float(n_rows))
    return compute_losses(cfg, stats[None], tt.rows(0, len(targets)), ones, norm_tok, norm_seq)


def _chunked(cfg, hidden, weight, targets, tt, n_rows, chunk):
    need_topk = bool(set(cfg.losses) & TOPK_LOSSES)
    norm_tok, norm_seq = torch.tensor(float(len(targets))), torch.tensor(float(n_rows))

    def chunk_loss(stats, s, e):
        return compute_losses(cfg, stats[None], tt.rows(s, e), torch.ones(1, e - s, dtype=torch.bool), norm_tok,
                              norm_seq)

    return fused_head_loss(hidden, weight, targets, chunk_loss, topk_ids_N_K=tt.topk_ids_N_K if need_topk else None,
                           chunk_tokens=chunk)


CASES = [(n, True) for n in NAMED_LOSS_SETS] + [(n, False) for n in NAMED_LOSS_SETS
                                                if set(NAMED_LOSS_SETS[n]) & TOPK_LOSSES]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name,tail_bucket", CASES)
def test_chunked_head_equals_full_logits(name, tail_bucket, dtype, rtol):
    cfg = named_loss_cfg(name, tail_bucket)
    hidden, weight, targets, tt, n_rows = _case(dtype=dtype)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref, ref_metrics = _full_path(cfg, h_ref, w_ref, targets, tt, n_rows)
    ref.backward()
    for chunk in (1, 6, 37, 1000):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, metrics = _chunked(cfg, h, w, targets, tt, n_rows, chunk)
        (2.0 * loss).backward()  # the stored gradients scale with the upstream gradient
        assert abs(loss.item()) > 1e-4
        assert loss.item() == pytest.approx(ref.item(), rel=rtol, abs=rtol)
        # atol: float32 gradients of ~1e-2 that cancel carry ~2e-7 of rounding, which BLAS kernels vary by CPU
        torch.testing.assert_close(h.grad, 2.0 * h_ref.grad, rtol=rtol, atol=rtol * 1e-1)
        torch.testing.assert_close(w.grad, 2.0 * w_ref.grad, rtol=rtol, atol=rtol * 1e-1)
        for key, value in ref_metrics.items():
            assert metrics[key].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6), key


def test_chunked_head_with_tied_embeddings_accumulates_both_uses():
    """A tied head weight also feeds the input: its gradient is the sum of both paths, as with full logits."""
    hidden, weight, targets, tt, n_rows = _case()
    cfg = named_loss_cfg("mixed")
    grads = []
    for chunked in (False, True):
        w = weight.clone().requires_grad_()
        h = hidden + w[targets].roll(1, 0)  # the "embedding" use of the same weight
        loss = (_chunked(cfg, h, w, targets, tt, n_rows, 5) if chunked
                else _full_path(cfg, h, w, targets, tt, n_rows))[0]
        loss.backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_head_prepass_selection_runs_the_loss_on_the_kept_tokens_only():
    """A pre-pass that keeps some tokens: the loss function sees only them (renumbered), the dropped tokens' hidden
    states get no gradient, and loss and gradients equal the full pass with those tokens weighted 0 (float64)."""
    from pipeline.train.head import fused_head_loss

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (10,), generator=g)
    keep = torch.tensor([1, 4, 5, 8])
    seen = []

    class Keep:
        entropy = True

        def chunk(self, stats, start, end):
            assert stats.entropy.shape == (end - start,)

        def done(self):
            return keep

    def kept_loss(stats, start, end):
        seen.append(end - start)
        return -stats.target_logprobs.sum() / 10, {}

    def weighted_loss(stats, start, end):
        w = torch.zeros(10, dtype=torch.float64)
        w[keep] = 1.0
        return -(stats.target_logprobs * w[start:end]).sum() / 10, {}

    loss, _ = fused_head_loss(hidden, weight, targets, kept_loss, chunk_tokens=3, prepass=Keep())
    grads = torch.autograd.grad(loss, [hidden, weight])
    ref, _ = fused_head_loss(hidden, weight, targets, weighted_loss, chunk_tokens=3)
    ref_grads = torch.autograd.grad(ref, [hidden, weight])
    assert seen == [3, 1] and loss.item() == pytest.approx(ref.item(), rel=1e-14)
    dropped = torch.ones(10, dtype=torch.bool)
    dropped[keep] = False
    assert torch.all(grads[0][dropped] == 0)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
