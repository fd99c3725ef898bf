"""pipeline/train/weighting.py: the pure weighting and routing functions against loop references and their
identities: route masks, PACED's kernel, position weights, SCOPE's weights, TIP's soft-OR scores."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.weighting import mean_one, paced_kernel, position_weights, route_mask, scope_weights


def test_route_mask_definitions():
    reward = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0])
    pass_rate = torch.tensor([1.0, 0.5, 0.5, 0.0, 1.0])
    assert route_mask("all", reward, pass_rate).tolist() == [True] * 5
    assert route_mask("correct", reward, pass_rate).tolist() == [True, False, True, False, True]
    assert route_mask("incorrect", reward, pass_rate).tolist() == [False, True, False, True, False]
    assert route_mask("solved", reward, pass_rate).tolist() == [True, False, False, False, True]
    assert route_mask("unsolved", reward, pass_rate).tolist() == [False, True, True, True, False]


def test_paced_kernel_identities():
    p = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    assert torch.equal(paced_kernel(p, 0.0, 0.0), torch.ones_like(p))  # alpha = beta = 0: the base loss
    w = paced_kernel(p, 1.0, 1.0)
    torch.testing.assert_close(w, torch.tensor([p_ * (1 - p_) for p_ in p.tolist()], dtype=torch.float64))
    assert w[0] == 0 and w[-1] == 0 and w.argmax() == 3  # never / always solved: 0; p = 0.5 the most
    torch.testing.assert_close(paced_kernel(p, 2.0, 0.5), p**2 * (1 - p) ** 0.5)
    scaled = mean_one(w, w.sum(), torch.tensor(6.0, dtype=torch.float64))
    assert scaled.mean().item() == pytest.approx(1.0, rel=1e-12)
    half = torch.full((4,), 0.5, dtype=torch.float64)  # p = 0.5 everywhere: weights 1
    k = paced_kernel(half, 1.0, 1.0)
    assert torch.equal(mean_one(k, k.sum(), torch.tensor(4.0, dtype=torch.float64)), torch.ones(4, dtype=torch.float64))
    zero = torch.zeros(3, dtype=torch.float64)
    assert torch.equal(mean_one(zero, zero.sum(), torch.tensor(3.0, dtype=torch.float64)), zero)


def test_position_weights_against_a_loop_reference():
    g = torch.Generator().manual_seed(1)
    gap = torch.randn(4, 9, generator=g, dtype=torch.float64)
    mask = torch.arange(9)[None, :] < torch.tensor([9, 1, 5, 0])[:, None]
    gap[2, 1] = 0.0
    for gamma in (0.0, 0.5, 2.0):
        w = position_weights(gap, mask, gamma)
        for b in range(4):
            valid = [t for t in range(9) if mask[b, t]]
            total = sum(abs(gap[b, t].item()) for t in valid)
            before = 0.0
            for t in valid:
                ref = 1 + gamma * (1 - before / total)
                assert w[b, t].item() == pytest.approx(ref, rel=1e-12)
                before += abs(gap[b, t].item())
            vals = [w[b, t].item() for t in valid]
            assert all(1.0 <= v <= 1.0 + gamma for v in vals)
            assert all(x >= y for x, y in zip(vals, vals[1:]))  # non-increasing
        if gamma == 0.0:
            assert torch.equal(w, torch.ones_like(w))
    # no gap at all in a row: uniform 1 + gamma
    assert torch.equal(position_weights(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), 0.5),
                       torch.full((1, 3), 1.5))


def test_scope_weights_against_a_loop_reference_and_their_identities():
    g = torch.Generator().manual_seed(4)
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
    correct = torch.tensor([True, False, False, True, False, True, False, True, True])
    teacher = -torch.rand(9, generator=g, dtype=torch.float64)
    behavior = -torch.rand(9, generator=g, dtype=torch.float64)
    for tau, sign in ((1.0, -1), (0.5, 1), (3.0, -1)):
        w = scope_weights(group, correct, teacher, behavior, tau, sign)
        for i in range(9):
            mates = [j for j in range(9) if group[j] == group[i] and correct[j] == correct[i]]
            score = [(sign * behavior[j] if correct[j] else teacher[j]).item() / tau for j in mates]
            ref = len(mates) * math.exp(score[mates.index(i)]) / sum(math.exp(x) for x in score)
            assert w[i].item() == pytest.approx(ref, rel=1e-12)
        for gi in range(3):  # each prompt's incorrect and correct subsets average 1
            for c in (True, False):
                sel = (group == gi) & (correct == c)
                if sel.any():
                    assert w[sel].mean().item() == pytest.approx(1.0, rel=1e-12)
    same = scope_weights(group, correct, torch.full((9,), -0.7, dtype=torch.float64),
                         torch.full((9,), -0.2, dtype=torch.float64))
    assert torch.equal(same, torch.ones(9, dtype=torch.float64))  # equal means: 1
    flat = scope_weights(group, correct, teacher, behavior, tau=1e12)
    torch.testing.assert_close(flat, torch.ones(9, dtype=torch.float64), rtol=0, atol=1e-10)  # tau -> inf


def test_tip_q3_only_ranks_confident_and_wrong_first():
    """TIP's Q3-only rule (low entropy, high divergence): the confident-and-wrong token first, the uncertain ones
    last whatever their divergence. (The soft-OR keeps the uncertain ones too: tests/train/test_paper_references.)"""
    from pipeline.train.weighting import tip_keep, tip_q3_only_scores, tip_soft_or_scores

    entropy = torch.tensor([0.1, 0.1, 2.0, 2.0, 1.0], dtype=torch.float64)
    divergence = torch.tensor([3.0, 0.01, 3.0, 0.01, 1.0], dtype=torch.float64)
    score = tip_q3_only_scores(entropy, divergence)
    assert score.argmax().item() == 0  # confident and wrong
    assert score[0] > score[1] and score[0] > score[2] and score[4] > score[3]
    assert score[2] == score[3] == 0  # the most uncertain tokens: 0
    assert tip_keep(score, 0.4, sample=False).tolist() == [True, False, False, False, True]
    assert tip_q3_only_scores(torch.ones(4, dtype=torch.float64), divergence[:4]).tolist() == divergence[:4].tolist()
    assert tip_keep(tip_soft_or_scores(entropy, divergence), 0.4, sample=False)[2]  # the OR keeps uncertain+wrong
