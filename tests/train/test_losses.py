"""pipeline/train/losses.py: the losses against independent float64 references, known identities, gradchecks and the
gradient-accumulation invariance the trainer relies on; the methods' loss functions (G-OPD's reward scale and
k3 guard, AKL, alpha-divergence, DPH-RL anchors, OPSD's per-token clip, KDRL, BAPO's bounds, Clip/KL-Cov
selection, G-OPD's top-k target). Tiny tensors only: the whole file runs in seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.train import losses as L
from pipeline.train.head import token_stats
from pipeline.train.losses import (
    combined_loss,
    forward_kl_topk,
    gather_logprobs,
    jsd_topk,
    lightning_pg,
    reverse_kl_topk,
    sft_cross_entropy,
    student_topk_tail_logprobs,
    tvd_topk,
    valid_count,
)
from tests.train.helpers import K

TOPK_LOSSES = {
    "forward_kl": forward_kl_topk,
    "reverse_kl": reverse_kl_topk,
    "jsd": lambda *a, **kw: jsd_topk(*a, beta=0.3, **kw),
    "tvd": tvd_topk,
}


def make_case(B=3, T=5, V=11, K=4, seed=0, dtype=torch.float64):
    """Random student logits, a teacher's top-k (its real top-k ids) with the tail mass, ragged mask."""
    g = torch.Generator().manual_seed(seed)
    student_logits = 2.0 * torch.randn(B, T, V, generator=g, dtype=dtype)
    teacher_logprobs = (2.0 * torch.randn(B, T, V, generator=g, dtype=dtype)).log_softmax(-1)
    topk_logprobs, topk_ids = teacher_logprobs.topk(K, dim=-1)
    outside = torch.ones_like(teacher_logprobs, dtype=torch.bool).scatter_(-1, topk_ids, False)
    tail = teacher_logprobs.masked_fill(~outside, -math.inf).logsumexp(-1)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return dict(student_logits=student_logits, topk_ids=topk_ids, topk_logprobs=topk_logprobs,
                tail=tail, mask=mask, teacher_logprobs=teacher_logprobs)


def student_topk(logits, ids, mask):
    """The student's top-k and tail log-probs from full logits (the reference path); padding ids replaced."""
    return student_topk_tail_logprobs(logits, ids.masked_fill(~mask.bool().unsqueeze(-1), 0))


def topk_args(case, logits=None):
    logits = case["student_logits"] if logits is None else logits
    return (*student_topk(logits, case["topk_ids"], case["mask"]), case["topk_logprobs"], case["tail"], case["mask"])


# --- brute-force float64 reference, written with explicit loops ---------------------------------


def reference_topk(name, case, tail_bucket, beta=0.3):
    logits = case["student_logits"].double().numpy()
    ids = case["topk_ids"].numpy()
    t_topk = case["topk_logprobs"].double().numpy()
    t_tail = case["tail"].double().numpy()
    mask = case["mask"].numpy()
    B, T, V = logits.shape
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            z = logits[b, t] - logits[b, t].max()
            p = np.exp(z) / np.exp(z).sum()
            ps = [p[i] for i in ids[b, t]]
            pt = [math.exp(x) for x in t_topk[b, t]]
            if tail_bucket:
                ps.append(sum(p[v] for v in range(V) if v not in set(ids[b, t])))
                pt.append(math.exp(t_tail[b, t]))
            else:
                ps = [x / sum(ps) for x in ps]
                pt = [x / sum(pt) for x in pt]
            if name == "forward_kl":
                value = sum(q * (math.log(q) - math.log(r)) for q, r in zip(pt, ps) if q > 0)
            elif name == "reverse_kl":
                value = sum(r * (math.log(r) - math.log(q)) for q, r in zip(pt, ps) if r > 0)
            elif name == "jsd":
                m = [beta * q + (1 - beta) * r for q, r in zip(pt, ps)]
                value = (beta * sum(q * math.log(q / mm) for q, mm in zip(pt, m) if q > 0)
                         + (1 - beta) * sum(r * math.log(r / mm) for r, mm in zip(ps, m) if r > 0))
            else:
                value = 0.5 * sum(abs(q - r) for q, r in zip(pt, ps))
            total += value
            count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("tail_bucket", [True, False])
@pytest.mark.parametrize("name", list(TOPK_LOSSES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_topk_losses_match_bruteforce_reference(name, tail_bucket, dtype, tol):
    case = make_case(seed=1, dtype=dtype)
    loss, metrics = TOPK_LOSSES[name](*topk_args(case), tail_bucket=tail_bucket)
    expected = reference_topk(name, case, tail_bucket)
    assert expected > 1e-3  # a non-trivial case
    assert loss.item() == pytest.approx(expected, rel=tol, abs=tol)
    assert metrics[f"loss/{name}"].item() == pytest.approx(loss.item())
    assert not metrics[f"loss/{name}"].requires_grad


def test_jsd_other_beta_matches_reference():
    case = make_case(seed=2)
    loss, _ = jsd_topk(*topk_args(case), beta=0.8)
    assert loss.item() == pytest.approx(reference_topk("jsd", case, True, beta=0.8), rel=1e-10)


def test_tail_mass_metrics():
    case = make_case(seed=3)
    _, metrics = forward_kl_topk(*topk_args(case))
    p = case["student_logits"].softmax(-1)
    student_tail = 1 - p.gather(-1, case["topk_ids"]).sum(-1)
    mask = case["mask"]
    assert metrics["topk/student_tail_mass"].item() == pytest.approx(student_tail[mask].mean().item(), rel=1e-10)
    assert metrics["topk/teacher_tail_mass"].item() == pytest.approx(case["tail"].exp()[mask].mean().item(), rel=1e-10)


# --- identities ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tail_bucket", [True, False])
@pytest.mark.parametrize("name", list(TOPK_LOSSES))
def test_identical_teacher_and_student_give_zero(name, tail_bucket):
    case = make_case(seed=4)
    # The teacher's stored values are the student's own distribution, computed here in numpy.
    logits = case["student_logits"].numpy()
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = case["topk_ids"].numpy()
    topk = np.take_along_axis(logp, ids, -1)
    tail = np.log(1.0 - np.exp(topk).sum(-1))
    case = {**case, "topk_logprobs": torch.from_numpy(topk), "tail": torch.from_numpy(tail)}
    loss, _ = TOPK_LOSSES[name](*topk_args(case), tail_bucket=tail_bucket)
    assert abs(loss.item()) < 1e-9
    # ...and the case is not trivially zero for another student.
    other, _ = TOPK_LOSSES[name](*topk_args(case, case["student_logits"].flip(-1)), tail_bucket=tail_bucket)
    assert other.item() > 1e-3


@pytest.mark.parametrize("tail_bucket", [True, False])
def test_topk_with_k_equal_vocab_is_full_kl(tail_bucket):
    """K = V: the tail holds no mass (stored -inf) and the loss is the full-vocabulary KL, gradients included."""
    B, T, V = 3, 4, 7
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64).log_softmax(-1)
    ids = torch.rand(B, T, V, generator=g).argsort(-1)  # every id, in a scrambled order
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    args = (teacher.gather(-1, ids), torch.full((B, T), -math.inf, dtype=torch.float64), mask)
    full = {  # F.kl_div(input, target) = KL(target || input)
        forward_kl_topk: lambda student: F.kl_div(student, teacher, log_target=True, reduction="none"),
        reverse_kl_topk: lambda student: F.kl_div(teacher, student, log_target=True, reduction="none"),
    }
    for fn, kl_div in full.items():
        expected = kl_div(logits.log_softmax(-1)).sum(-1)[mask].mean()
        (expected_grad,) = torch.autograd.grad(expected, logits)
        loss, metrics = fn(*student_topk(logits, ids, mask), *args, tail_bucket=tail_bucket)
        (grad,) = torch.autograd.grad(loss, logits)
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
        assert metrics["topk/student_tail_mass"].item() == 0.0


def test_jsd_endpoints_are_forward_and_reverse_kl():
    case = make_case(seed=6)
    for tail_bucket in (True, False):
        forward, _ = forward_kl_topk(*topk_args(case), tail_bucket=tail_bucket)
        reverse, _ = reverse_kl_topk(*topk_args(case), tail_bucket=tail_bucket)
        assert jsd_topk(*topk_args(case), beta=0.0, tail_bucket=tail_bucket)[0].item() == pytest.approx(forward.item())
        assert jsd_topk(*topk_args(case), beta=1.0, tail_bucket=tail_bucket)[0].item() == pytest.approx(reverse.item())
        # The endpoint conventions are the limits of the mixture formula: JSD_b / b -> forward KL as b -> 0,
        # JSD_b / (1 - b) -> reverse KL as b -> 1.
        eps = 1e-6
        near_0 = jsd_topk(*topk_args(case), beta=eps, tail_bucket=tail_bucket)[0].item() / eps
        near_1 = jsd_topk(*topk_args(case), beta=1 - eps, tail_bucket=tail_bucket)[0].item() / eps
        assert near_0 == pytest.approx(forward.item(), rel=1e-4)
        assert near_1 == pytest.approx(reverse.item(), rel=1e-4)
    with pytest.raises(ValueError, match="beta"):
        jsd_topk(*topk_args(case), beta=1.5)


def test_reverse_kl_without_tail_cannot_see_mass_leaving_the_support():
    """Why the tail bucket: moving student mass outside the top-k leaves the tail-less loss unchanged."""
    case = make_case(seed=7)
    outside = torch.ones_like(case["student_logits"], dtype=torch.bool).scatter_(-1, case["topk_ids"], False)
    leaky = case["student_logits"] + 5.0 * outside  # same ratios inside the top-k, much more mass outside
    blind_before, m_before = reverse_kl_topk(*topk_args(case), tail_bucket=False)
    blind_after, m_after = reverse_kl_topk(*topk_args(case, leaky), tail_bucket=False)
    seen_before, _ = reverse_kl_topk(*topk_args(case), tail_bucket=True)
    seen_after, _ = reverse_kl_topk(*topk_args(case, leaky), tail_bucket=True)
    assert blind_after.item() == pytest.approx(blind_before.item(), rel=1e-9)
    assert seen_after.item() > seen_before.item() + 0.5
    assert m_after["topk/student_tail_mass"] > m_before["topk/student_tail_mass"] + 0.25


def test_student_tail_is_accurate_when_tiny_in_float32():
    """log(1 - sum p_topk) would be -inf or garbage here in float32; the masked logsumexp is exact."""
    V, K = 11, 4
    logits = torch.full((1, 1, V), -40.0)
    logits[..., :K] = 0.0
    ids = torch.arange(K).view(1, 1, K)
    topk, tail = student_topk_tail_logprobs(logits, ids)
    expected_tail = -40.0 + math.log(V - K) - math.log(K + (V - K) * math.exp(-40.0))
    assert tail.item() == pytest.approx(expected_tail, abs=1e-4)
    assert topk[0, 0, 0].item() == pytest.approx(-math.log(K), abs=1e-6)


# --- gradcheck -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tail_bucket", [True, False])
@pytest.mark.parametrize("name", list(TOPK_LOSSES))
def test_topk_gradcheck(name, tail_bucket):
    case = make_case(B=2, T=3, V=7, K=3, seed=8)
    logits = case["student_logits"].clone().requires_grad_(True)
    fn = TOPK_LOSSES[name]
    assert torch.autograd.gradcheck(lambda x: fn(*topk_args(case, x), tail_bucket=tail_bucket)[0], (logits,))


@pytest.mark.parametrize("normalization", ["token", "sequence"])
@pytest.mark.parametrize("importance", ["none", "truncated", "ppo_clip"])
def test_lightning_gradcheck(importance, normalization):
    """The advantage is a stop-gradient: finite differences must hold it fixed, so the teacher input
    moves with the student (teacher = x + A0). The truncated weight is a stop-gradient too, so its
    behaviour log-probs move with x; the PPO ratio is differentiated, so its behaviour stays fixed."""
    g = torch.Generator().manual_seed(9)
    B, T = 3, 4
    x = (-0.1 - torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    advantage = torch.randn(B, T, generator=g, dtype=torch.float64)
    log_ratio = 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)
    behavior_fixed = x.detach().clone() - log_ratio
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)

    def f(x):
        behavior = x.detach() - log_ratio if importance == "truncated" else behavior_fixed
        return lightning_pg(x, x.detach() + advantage, behavior, mask, importance=importance,
                            normalization=normalization, advantage_clip=1.5)[0]

    assert torch.autograd.gradcheck(f, (x,))


# --- lightning_pg --------------------------------------------------------------------------------


def make_pg_case(B=4, T=6, V=9, seed=10):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64).log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    behavior = gather_logprobs(logits.detach() + 0.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64), ids)
    lengths = torch.tensor([T, 3, 1, 0])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logits, ids, teacher, behavior, mask


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_lightning_none_is_the_analytic_reinforce_gradient(normalization):
    logits, ids, teacher, behavior, mask = make_pg_case()
    loss, _ = lightning_pg(gather_logprobs(logits, ids), teacher, behavior, mask, normalization=normalization)
    (grad,) = torch.autograd.grad(loss, logits)

    p = logits.detach().softmax(-1).numpy()
    lengths = mask.sum(-1).numpy()
    expected = np.zeros_like(p)
    for b in range(p.shape[0]):
        for t in range(p.shape[1]):
            if not mask[b, t]:
                continue
            weight = 1 / mask.sum().item() if normalization == "token" else 1 / (lengths[b] * (lengths > 0).sum())
            advantage = teacher[b, t].item() - math.log(p[b, t, ids[b, t]])
            onehot = np.eye(p.shape[-1])[ids[b, t]]
            expected[b, t] = -weight * advantage * (onehot - p[b, t])  # d/dlogits of -A log p(y)
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_importance_variants_with_behavior_equal_to_current_policy_are_reinforce(normalization):
    logits, ids, teacher, _, mask = make_pg_case()
    grads, losses = {}, {}
    for importance in ("none", "truncated", "ppo_clip"):
        logprobs = gather_logprobs(logits, ids)
        loss, metrics = lightning_pg(logprobs, teacher, logprobs.detach(), mask, importance=importance,
                                     normalization=normalization)
        (grads[importance],) = torch.autograd.grad(loss, logits)
        losses[importance] = loss.item()
        assert metrics["is/ratio_mean"].item() == pytest.approx(1.0)
        assert metrics["is/clip_frac"].item() == 0.0
    torch.testing.assert_close(grads["ppo_clip"], grads["none"], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grads["truncated"], grads["none"], rtol=1e-10, atol=1e-14)
    assert losses["truncated"] == pytest.approx(losses["none"])
    assert losses["ppo_clip"] != pytest.approx(losses["none"])  # values differ by design: -A vs -A log p


def test_truncated_importance_caps_the_weights():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    behavior = torch.tensor([[-1.0 - math.log(5.0), -1.0 - math.log(1.5), -1.0 + math.log(2.0), -3.0]],
                            dtype=torch.float64)  # ratios 5, 1.5, 0.5, e^2
    teacher = torch.tensor([[-0.5, -2.0, -0.2, -1.7]], dtype=torch.float64)  # A = 0.5, -1, 0.8, -0.7
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    loss, metrics = lightning_pg(logprobs, teacher, behavior, mask, importance="truncated", is_cap=2.0,
                                 normalization="token")
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = -torch.tensor([[2.0 * 0.5, 1.5 * -1.0, 0.5 * 0.8, 0.0]], dtype=torch.float64) / 3
    torch.testing.assert_close(grad, expected)
    # Only the ratio-5 token is capped; the masked ratio e^2 is not counted.
    assert metrics["is/clip_frac"].item() == pytest.approx(1 / 3)
    assert metrics["is/ratio_max"].item() == pytest.approx(5.0)
    assert metrics["is/ratio_mean"].item() == pytest.approx((5.0 + 1.5 + 0.5) / 3)


def test_ppo_clip_frac_and_zero_gradient_where_clipped():
    # ratio:          1.5     1.5    0.5    0.5    1.1    1.5 (masked)
    # advantage:      +1      -1     -1     +1     +1     +1
    # clipped branch: yes     no     yes    no     no     (not counted)
    log_ratio = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1, 1.5]], dtype=torch.float64))
    advantage = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    logprobs = torch.full((1, 6), -1.0, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    loss, metrics = lightning_pg(logprobs, logprobs.detach() + advantage, logprobs.detach() - log_ratio, mask,
                                 importance="ppo_clip", clip_eps_low=0.2, clip_eps_high=0.28, normalization="token")
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert metrics["is/clip_frac"].item() == pytest.approx(2 / 5)
    ratio = log_ratio.exp()
    expected = torch.where(torch.tensor([[False, True, False, True, True, False]]), -ratio * advantage / 5, 0.0)
    torch.testing.assert_close(grad, expected)
    clipped_value = -(1.28 * 1.0 + 1.5 * -1.0 + 0.8 * -1.0 + 0.5 * 1.0 + 1.1 * 1.0) / 5
    assert loss.item() == pytest.approx(clipped_value)


def test_advantage_clip_and_metrics():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64)
    teacher = torch.tensor([[-9.0, 0.0, -1.5]], dtype=torch.float64)  # A = -8, 1, -0.5
    mask = torch.ones(1, 3, dtype=torch.bool)
    _, metrics = lightning_pg(logprobs, teacher, logprobs, mask, advantage_clip=2.0)
    assert metrics["lightning/advantage_mean"].item() == pytest.approx((-2.0 + 1.0 - 0.5) / 3)
    assert metrics["lightning/advantage_clip_frac"].item() == pytest.approx(1 / 3)
    assert metrics["lightning/reverse_kl_estimate"].item() == pytest.approx((8.0 - 1.0 + 0.5) / 3)
    with pytest.raises(ValueError, match="importance"):
        lightning_pg(logprobs, teacher, logprobs, mask, importance="ppo")


def test_lightning_step_moves_the_student_toward_the_teacher():
    """The advantage's sign: the sampled-token gradient follows grad KL(p_theta || p_T), and one SGD
    step on it lowers the exact reverse KL. A flipped sign would raise it."""
    g = torch.Generator().manual_seed(11)
    V, N = 6, 20000
    teacher = torch.randn(V, generator=g, dtype=torch.float64).log_softmax(-1)
    theta = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_(True)

    def exact_reverse_kl(theta):
        logp = theta.log_softmax(-1)
        return (logp.exp() * (logp - teacher)).sum()

    ids = torch.multinomial(theta.detach().softmax(-1), N, replacement=True, generator=g).view(N, 1)
    logprobs = gather_logprobs(theta.expand(N, 1, V), ids)
    loss, _ = lightning_pg(logprobs, teacher[ids], logprobs.detach(), torch.ones(N, 1, dtype=torch.bool))
    (grad,) = torch.autograd.grad(loss, theta)
    before = exact_reverse_kl(theta)
    (exact_grad,) = torch.autograd.grad(before, theta)
    assert F.cosine_similarity(grad, exact_grad, dim=0).item() > 0.95
    with torch.no_grad():
        after = exact_reverse_kl(theta - 0.5 * grad)
    assert after.item() < before.item() - 0.01


# --- gradient accumulation and masking -----------------------------------------------------------


def _accum_losses():
    """name -> (normalization, fn(logits_B_T_V, case, normalizer) -> loss)."""

    def topk(fn):
        return lambda logits, c, n: fn(*student_topk(logits, c["topk_ids"], c["mask"]), c["topk_logprobs"], c["tail"],
                                       c["mask"], normalizer=n)[0]

    def pg(importance, normalization):
        return lambda logits, c, n: lightning_pg(gather_logprobs(logits, c["ids"]), c["teacher"], c["behavior"],
                                                 c["mask"], importance=importance, normalization=normalization,
                                                 normalizer=n)[0]

    return {
        "forward_kl": ("token", topk(forward_kl_topk)),
        "reverse_kl": ("token", topk(reverse_kl_topk)),
        "jsd": ("token", topk(jsd_topk)),
        "tvd": ("token", topk(tvd_topk)),
        "sft": ("token", lambda logits, c, n: sft_cross_entropy(gather_logprobs(logits, c["ids"]), c["mask"],
                                                                  normalizer=n)[0]),
        "lightning_token": ("token", pg("none", "token")),
        "lightning_sequence": ("sequence", pg("none", "sequence")),
        "lightning_ppo_sequence": ("sequence", pg("ppo_clip", "sequence")),
        "lightning_truncated_token": ("token", pg("truncated", "token")),
    }


@pytest.mark.parametrize("name", list(_accum_losses()))
def test_gradient_accumulation_invariance(name):
    """Batch 8 x accum 1 == batch 1 x accum 8 when every micro-batch divides by the global count."""
    normalization, fn = _accum_losses()[name]
    B, T, V = 8, 6, 11
    case = make_case(B=B, T=T, V=V, K=4, seed=12)
    g = torch.Generator().manual_seed(13)
    case["mask"] = torch.arange(T)[None, :] < torch.tensor([6, 1, 4, 0, 2, 6, 3, 5])[:, None]  # one empty row
    case["ids"] = torch.randint(0, V, (B, T), generator=g)
    case["teacher"] = case["teacher_logprobs"].gather(-1, case["ids"][..., None])[..., 0]
    perturbed = case["student_logits"] + 0.3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    case["behavior"] = gather_logprobs(perturbed, case["ids"])
    logits = case["student_logits"].clone().requires_grad_(True)

    full = fn(logits, case, None)
    (full_grad,) = torch.autograd.grad(full, logits)

    def accumulate(normalizer):
        total, grad = 0.0, torch.zeros_like(logits)
        for i in range(B):
            micro = {k: v[i:i + 1] for k, v in case.items()}
            loss = fn(logits[i:i + 1], micro, normalizer)
            grad += torch.autograd.grad(loss, logits)[0]
            total += loss.item()
        return total, grad

    total, grad = accumulate(valid_count(case["mask"], normalization))
    assert total == pytest.approx(full.item(), rel=1e-10)
    torch.testing.assert_close(grad, full_grad, rtol=1e-9, atol=1e-13)
    # Each micro-batch dividing by its own count is not invariant: the check above can fail.
    _, local_grad = accumulate(None)
    assert not torch.allclose(local_grad, full_grad)


@pytest.mark.parametrize("name", list(_accum_losses()))
def test_fully_masked_batch_gives_zero_loss_and_finite_grads(name):
    _, fn = _accum_losses()[name]
    B, T, V, K = 2, 3, 7, 3
    logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    nan = torch.full((B, T), math.nan, dtype=torch.float64)
    case = {  # padding as a careless collator might write it
        "topk_ids": torch.full((B, T, K), -1), "topk_logprobs": torch.full((B, T, K), -math.inf, dtype=torch.float64),
        "tail": nan, "mask": torch.zeros(B, T), "ids": torch.zeros(B, T, dtype=torch.long),
        "teacher": nan, "behavior": torch.full((B, T), -math.inf, dtype=torch.float64),
    }
    loss = fn(logits, case, None)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0
    assert torch.isfinite(grad).all() and (grad == 0).all()


def test_masked_padding_does_not_change_the_loss():
    case = make_case(seed=14)
    padded = dict(case)
    pad = ~case["mask"]
    padded["topk_ids"] = case["topk_ids"].masked_fill(pad[..., None], -1)
    padded["topk_logprobs"] = case["topk_logprobs"].masked_fill(pad[..., None], math.nan)
    padded["tail"] = case["tail"].masked_fill(pad, -math.inf)
    for fn in TOPK_LOSSES.values():
        clean, _ = fn(*topk_args(case))
        dirty, _ = fn(*topk_args(padded))
        assert dirty.item() == pytest.approx(clean.item(), rel=1e-12)


def test_valid_count():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert valid_count(mask, "token").item() == 3
    assert valid_count(mask, "sequence").item() == 2
    with pytest.raises(ValueError, match="normalization"):
        valid_count(mask, "tokens")


# --- SFT and combination -------------------------------------------------------------------------


def test_sft_cross_entropy_matches_torch():
    g = torch.Generator().manual_seed(15)
    logits = torch.randn(3, 5, 11, generator=g)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    stats = token_stats(logits.to(torch.bfloat16), targets, argmax=True)
    loss, metrics = sft_cross_entropy(stats.target_logprobs, mask, correct_B_T=stats.argmax_ids == targets)
    expected = F.cross_entropy(logits.to(torch.bfloat16).float().view(-1, 11),
                               targets.masked_fill(~mask, -100).view(-1), ignore_index=-100)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    accuracy = (logits.argmax(-1) == targets)[mask].float().mean()
    assert metrics["sft/accuracy"].item() == pytest.approx(accuracy.item())


def test_combined_loss():
    a = (torch.tensor(2.0, requires_grad=True), {"loss/a": torch.tensor(2.0)})
    b = (torch.tensor(3.0, requires_grad=True), {"loss/b": torch.tensor(3.0)})
    total, metrics = combined_loss({"a": a, "b": b}, {"a": 0.5, "b": 2.0})
    assert total.item() == pytest.approx(7.0)
    assert set(metrics) == {"loss/a", "loss/b", "loss/total"}
    assert metrics["loss/total"].item() == pytest.approx(7.0) and not metrics["loss/total"].requires_grad
    total.backward()
    assert a[0].grad.item() == 0.5 and b[0].grad.item() == 2.0
    with pytest.raises(ValueError, match="same"):
        combined_loss({"a": a, "b": b}, {"a": 1.0})
    with pytest.raises(ValueError, match="repeats"):
        combined_loss({"a": a, "c": (b[0], {"loss/a": b[1]["loss/b"]})}, {"a": 1.0, "c": 1.0})


# --- G-OPD / ExOPD: the reward scale and the k3 guard in lightning_pg -------------------------------------------


def _pg_case(seed=0, B=3, T=6):
    g = torch.Generator().manual_seed(seed)
    student = (-2 * torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = -2 * torch.rand(B, T, generator=g, dtype=torch.float64)
    behavior = -2 * torch.rand(B, T, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None, :] < torch.tensor([6, 2, 4])[:, None]
    return student, teacher, behavior, mask


def test_gopd_lambda_one_is_lightning_bit_for_bit_and_the_formula_holds():
    student, teacher, behavior, mask = _pg_case()
    for importance in ("none", "truncated", "ppo_clip"):
        base, _ = L.lightning_pg(student, teacher, behavior, mask, importance=importance)
        same, _ = L.lightning_pg(student, teacher, behavior, mask, importance=importance, reward_scale=1.0)
        assert torch.equal(base, same)
    for lam in (0.5, 1.25, 2.0):
        loss, metrics = L.lightning_pg(student, teacher, behavior, mask, reward_scale=lam, normalization="token")
        (grad,) = torch.autograd.grad(loss, student)
        n = int(mask.sum())
        ref_loss, ref_grad = 0.0, torch.zeros_like(student)
        for b, t in zip(*torch.nonzero(mask, as_tuple=True)):
            lt, lth, lmu = teacher[b, t].item(), student[b, t].item(), behavior[b, t].item()
            a = lam * (lt - lmu) - (lth - lmu)
            ref_loss += -a * lth / n
            ref_grad[b, t] = -a / n
        assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


def test_gopd_lambda_is_irrelevant_when_the_reference_is_the_teacher():
    student, teacher, _, mask = _pg_case(seed=2)
    results = []
    for lam in (1.0, 1.25, 3.0):
        loss, _ = L.lightning_pg(student, teacher, teacher, mask, reward_scale=lam)
        results.append((loss.item(), torch.autograd.grad(loss, student)[0]))
    for loss, grad in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-12)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-12, atol=1e-15)


def test_k3_guard_is_zero_with_zero_gradient_at_the_rollout_policy_and_matches_its_formula():
    student, teacher, behavior, mask = _pg_case(seed=3)
    at_mu = behavior.clone().requires_grad_()
    plain, _ = L.lightning_pg(at_mu, teacher, behavior, mask)
    guarded, metrics = L.lightning_pg(at_mu, teacher, behavior, mask, k3_guard=0.3)
    assert metrics["lightning/k3_guard"].item() == 0.0 and guarded.item() == plain.item()
    g_plain = torch.autograd.grad(plain, at_mu)[0]
    torch.testing.assert_close(torch.autograd.grad(guarded, at_mu)[0], g_plain, rtol=0, atol=1e-15)
    _, metrics = L.lightning_pg(student, teacher, behavior, mask, k3_guard=0.3)
    d = (student - behavior).detach()[mask]
    assert metrics["lightning/k3_guard"].item() == pytest.approx(((-d).exp() - 1 + d).mean().item(), rel=1e-12)
    assert metrics["lightning/k3_guard"].item() > 0


# --- AKL, top-k alpha-divergence, DPH-RL anchors ------------------------------------------------------------------


def _bucket_case(seed=0, N=6, K=4, equal=False):
    g = torch.Generator().manual_seed(seed)
    teacher = (2 * torch.randn(N, 12, generator=g, dtype=torch.float64)).log_softmax(-1).sort(-1, descending=True)[0]
    student = teacher.clone() if equal else (2 * torch.randn(N, 12, generator=g, dtype=torch.float64)).log_softmax(-1)
    t_topk, s_topk = teacher[:, :K], student[:, :K]
    t_tail, s_tail = teacher[:, K:].logsumexp(-1), student[:, K:].logsumexp(-1)
    mask = torch.ones(1, N, dtype=torch.bool)
    return s_topk[None].requires_grad_(), s_tail[None], t_topk[None], t_tail[None], mask


def _buckets(topk, tail):
    return torch.cat([topk, tail.unsqueeze(-1)], -1).exp()


def test_akl_against_a_loop_reference_and_zero_at_equality():
    s_topk, s_tail, t_topk, t_tail, mask = _bucket_case()
    for head_mass in (0.3, 0.5, 0.9):
        loss, metrics = L.akl_topk(s_topk, s_tail, t_topk, t_tail, mask, head_mass=head_mass)
        pt, ps = _buckets(t_topk, t_tail)[0], _buckets(s_topk, s_tail)[0].detach()
        total, heads = 0.0, []
        for n in range(pt.shape[0]):
            cum, gh, gt = 0.0, 0.0, 0.0
            for b in range(pt.shape[1]):
                cum += pt[n, b].item()
                if b == 0 or cum <= head_mass:
                    gh += abs(pt[n, b] - ps[n, b]).item()
                else:
                    gt += abs(pt[n, b] - ps[n, b]).item()
            fkl = sum((pt[n, b] * (pt[n, b] / ps[n, b]).log()).item() for b in range(pt.shape[1]))
            rkl = sum((ps[n, b] * (ps[n, b] / pt[n, b]).log()).item() for b in range(pt.shape[1]))
            total += (gh * fkl + gt * rkl) / (gh + gt)
            heads.append(gh / (gh + gt))
        assert loss.item() == pytest.approx(total / pt.shape[0], rel=1e-10)
        assert metrics["akl/head_weight"].item() == pytest.approx(np.mean(heads), rel=1e-10)
    equal = _bucket_case(equal=True)
    loss, _ = L.akl_topk(*equal)
    assert loss.item() == 0.0


def test_alpha_divergence_limits_and_zero_at_equality():
    case = _bucket_case(seed=1)
    s_topk, s_tail, t_topk, t_tail, mask = case
    forward, _ = L.forward_kl_topk(*case)
    reverse, _ = L.reverse_kl_topk(*case)
    near_one, _ = L.alpha_topk(*case, alpha=1 - 1e-7)
    near_zero, _ = L.alpha_topk(*case, alpha=1e-7)
    assert near_one.item() == pytest.approx(forward.item(), rel=1e-5)
    assert near_zero.item() == pytest.approx(reverse.item(), rel=1e-5)
    loss, _ = L.alpha_topk(*case, alpha=0.2)
    pt, ps = _buckets(t_topk, t_tail)[0], _buckets(s_topk, s_tail)[0]
    ref = ((1 - (pt**0.2 * ps**0.8).sum(-1)) / (0.2 * 0.8)).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    equal, _ = L.alpha_topk(*_bucket_case(equal=True), alpha=0.2)
    assert abs(equal.item()) < 1e-14


def test_anchor_generators_zero_at_the_rollout_policy_and_their_limits():
    student, _, behavior, mask = _pg_case(seed=5)
    u = (student - behavior).detach().exp()[mask]
    refs = {"forward_kl": u - u.log() - 1, "js": u * u.log() - (u + 1) * ((u + 1) / 2).log(),
            "alpha": (u**0.8 - 0.8 * u - 0.2) / (0.2 * -0.8)}
    for generator, ref in refs.items():
        loss, metrics = L.anchor_divergence(student, behavior, mask, generator=generator, alpha=0.2)
        assert loss.item() == pytest.approx(ref.mean().item(), rel=1e-10) and loss.item() > 0
        at_mu = behavior.clone().requires_grad_()
        zero, _ = L.anchor_divergence(at_mu, behavior, mask, generator=generator, alpha=0.2)
        (grad,) = torch.autograd.grad(zero, at_mu)
        assert abs(zero.item()) < 1e-14 and torch.all(grad.abs() < 1e-14)
    forward, _ = L.anchor_divergence(student, behavior, mask, generator="forward_kl")
    near_one, _ = L.anchor_divergence(student, behavior, mask, generator="alpha", alpha=1 - 1e-7)
    near_zero, _ = L.anchor_divergence(student, behavior, mask, generator="alpha", alpha=1e-7)
    assert near_one.item() == pytest.approx(forward.item(), rel=1e-5)
    assert near_zero.item() == pytest.approx((u * u.log() - u + 1).mean().item(), rel=1e-5)  # KL(theta || mu)


# --- OPSD: the per-token clip of the top-k losses ------------------------------------------------------------------


def _clip_bucket_case(seed=0, N=8):
    g = torch.Generator().manual_seed(seed)
    teacher = (3 * torch.randn(N, 12, generator=g, dtype=torch.float64)).log_softmax(-1).sort(-1, descending=True)[0]
    student = (3 * torch.randn(N, 12, generator=g, dtype=torch.float64)).log_softmax(-1)
    s_topk = student[:, :K][None].clone().requires_grad_()
    return s_topk, student[:, K:].logsumexp(-1)[None], teacher[:, :K][None], teacher[:, K:].logsumexp(-1)[None]


@pytest.mark.parametrize("name", ["reverse_kl_topk", "forward_kl_topk", "jsd_topk", "tvd_topk", "akl_topk",
                                  "alpha_topk"])
def test_opsd_token_clip_is_min_of_each_tokens_divergence(name):
    """min(D_t, c) against the unclipped per-token values (float64): the loss is the mean of the clipped values,
    clipped tokens get no gradient, the others the unclipped gradient; an unreachable cap is the plain loss bit
    for bit."""
    s_topk, s_tail, t_topk, t_tail = _clip_bucket_case()
    mask = torch.ones(1, 8, dtype=torch.bool)
    fn = getattr(L, name)
    per_token = [fn(s_topk[:, i: i + 1], s_tail[:, i: i + 1], t_topk[:, i: i + 1], t_tail[:, i: i + 1],
                    mask[:, :1])[0] for i in range(8)]
    values = torch.stack([v.detach() for v in per_token])
    c = float(values.median())
    loss, metrics = fn(s_topk, s_tail, t_topk, t_tail, mask, token_clip=c)
    assert loss.item() == pytest.approx(values.clamp_max(c).mean().item(), rel=1e-12)
    assert metrics["topk/token_clip_frac"].item() == pytest.approx((values > c).double().mean().item())
    (grad,) = torch.autograd.grad(loss, s_topk)
    for i in range(8):
        (ref,) = torch.autograd.grad(per_token[i] / 8, s_topk)
        if values[i] > c:
            assert torch.all(grad[0, i] == 0)
        else:
            torch.testing.assert_close(grad[0, i], ref[0, i], rtol=1e-12, atol=1e-15)
    plain, _ = fn(s_topk, s_tail, t_topk, t_tail, mask)
    far, _ = fn(s_topk, s_tail, t_topk, t_tail, mask, token_clip=1e30)
    assert torch.equal(plain, far)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(plain, s_topk), torch.autograd.grad(far, s_topk),
                                                 strict=True))


# --- KDRL -----------------------------------------------------------------------------------------------------------


def _kdrl_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(3, 6, generator=g, dtype=torch.float64) - 1.5).requires_grad_()
    teacher = torch.randn(3, 6, generator=g, dtype=torch.float64) - 1.5
    behavior = student.detach() + 0.4 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    return student, teacher, behavior, mask


def test_kdrl_with_beta_zero_is_grpo_and_equal_rewards_leave_pure_distillation():
    student, teacher, behavior, mask = _kdrl_case()
    advantage = torch.tensor([1.2, -0.7, 0.3], dtype=torch.float64)[:, None].expand(3, 6)
    failed = torch.tensor([False, True, True])[:, None].expand(3, 6)
    grpo, metrics = L.kdrl(student, teacher, behavior, advantage, failed, mask, beta=0.0)
    r = (student - behavior).exp()
    ppo = -torch.minimum(r * advantage, r.clamp(0.8, 1.28) * advantage)
    assert grpo.item() == pytest.approx(ppo[mask].mean().item(), rel=1e-12)
    assert metrics["kdrl/failed_frac"].item() == pytest.approx(10 / 16)
    # equal rewards in every group: Ahat = 0, only the distillation term on the failed rollouts remains
    zero = torch.zeros(3, 6, dtype=torch.float64)
    loss, _ = L.kdrl(student, teacher, behavior, zero, failed, mask, beta=5e-3, is_cap=2.0)
    distill = torch.where(failed, r.detach().clamp_max(2.0) * 0.5 * (student - teacher) ** 2, 0.0)
    ref = 5e-3 * distill[mask].sum() / mask.sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, student)
    (ref_grad,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)
    assert torch.all(grad[0] == 0)  # the solved rollout gets no distillation gradient


# --- BAPO -----------------------------------------------------------------------------------------------------------


def test_bapo_bounds_widen_until_the_contributions_balance():
    """The released rule (balance "clamped": each token's clipped surrogate value, every token counted): c_lo climbs
    to its max first, then c_hi, until P / N reaches the target; the earlier "surviving" rule (only the tokens whose
    gradient survives the clip) stays an option. tests/train/test_paper_references.py checks the search against a
    transcript of the authors' code."""
    d = torch.float64
    # released: P = min(1.6, c_hi), N = 1.4 (r = 1 is above every c_lo): c_lo to 0.8, then c_hi up to 1.45
    assert L.bapo_bounds(torch.tensor([1.6, 1.0], dtype=d), torch.tensor([1.0, -1.4], dtype=d)) == pytest.approx(
        (0.8, 1.45))
    ratio, adv = torch.tensor([1.0, 0.62, 0.9], dtype=d), torch.tensor([1.0, -1.0, -1.0], dtype=d)
    # released: the token at r = 0.62 adds max(r, c_lo) |A| to N, more as c_lo rises; P = 1 whatever c_hi: no balance
    assert L.bapo_bounds(ratio, adv) == pytest.approx((0.8, 2.0))
    # surviving: c_lo rises from 0.6 past 0.62, dropping that token's negative contribution
    low, high = L.bapo_bounds(ratio, adv, balance="surviving")
    assert low == pytest.approx(0.65) and high == 1.2
    ratio, adv = torch.tensor([1.45, 0.9, 1.0], dtype=d), torch.tensor([1.0, -1.0, 0.1], dtype=d)
    # released: P = min(1.45, 1.2) + 0.1 = 1.3 > N = 0.9 from the start
    assert L.bapo_bounds(ratio, adv) == (0.6, 1.2)
    # surviving: c_lo reaches its max, then c_hi rises until the positive token at r = 1.45 counts
    low, high = L.bapo_bounds(ratio, adv, balance="surviving")
    assert low == pytest.approx(0.8) and 1.45 <= high < 1.5 + 1e-9
    # all advantages >= 0, or step 0: the bounds stay
    for balance in ("clamped", "surviving"):
        assert L.bapo_bounds(ratio, adv.abs(), balance=balance) == (0.6, 1.2)
        assert L.bapo_bounds(torch.tensor([1.0, 0.62], dtype=d), torch.tensor([0.1, -1.0], dtype=d), step=0.0,
                             balance=balance) == (0.6, 1.2)
    # nothing can balance under surviving (r = 3 never counts): both bounds end at their max; released: P = c_hi
    ratio, adv = torch.tensor([3.0, 1.0], dtype=d), torch.tensor([1.0, -1.0], dtype=d)
    assert L.bapo_bounds(ratio, adv, balance="surviving") == pytest.approx((0.8, 2.0))
    assert L.bapo_bounds(ratio, adv) == (0.6, 1.2)
    with pytest.raises(ValueError, match="balance must be"):
        L.bapo_bounds(ratio, adv, balance="all")


def test_bapo_clip_at_adapted_bounds_against_the_released_surrogate():
    """lightning's PPO-clip at the bounds bapo_bounds adapts, away from the rollout policy (ratios on both sides
    of the bounds), against the released surrogate written out: token mean of max(-A r, -A clip(r, c_lo, c_hi)),
    A = lT - lth (detached). The bounds move and matter: the loss at the start bounds differs. At p_theta = mu
    (r = 1, inside any bounds) the gradient is importance "none"'s."""
    student, teacher, behavior, mask = _kdrl_case(seed=3)
    teacher = teacher - 1.0  # advantages mostly negative: the bounds move
    adv = (teacher - student).detach()
    ratio = (student - behavior).exp()
    valid = mask.bool()
    bounds = L.bapo_bounds(ratio[valid].detach(), adv[valid])
    assert bounds != (0.6, 1.2)
    got, _ = L.lightning_pg(student, teacher, behavior, mask, importance="ppo_clip", ratio_bounds=bounds,
                            normalization="token")

    def released(lo, hi):
        return torch.maximum(-adv * ratio, -adv * ratio.clamp(lo, hi))[valid].mean()

    ref = released(*bounds)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    assert abs(released(0.6, 1.2).item() - ref.item()) > 1e-6
    torch.testing.assert_close(torch.autograd.grad(got, student)[0], torch.autograd.grad(ref, student)[0],
                               rtol=1e-12, atol=1e-15)
    at_mu = behavior.clone().requires_grad_()
    bapo, _ = L.lightning_pg(at_mu, teacher, behavior, mask, importance="ppo_clip", ratio_bounds=bounds,
                             normalization="token")
    plain, _ = L.lightning_pg(at_mu, teacher, behavior, mask, importance="none", normalization="token")
    torch.testing.assert_close(torch.autograd.grad(bapo, at_mu)[0], torch.autograd.grad(plain, at_mu)[0],
                               rtol=1e-12, atol=1e-15)


# --- Clip-Cov / KL-Cov ----------------------------------------------------------------------------------------------


def test_covariance_select_definitions():
    lp = torch.tensor([-0.1, -2.0, -0.5, -3.0, -1.0], dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0, 0.5, 1.0, 0.0], dtype=torch.float64)
    cov = (lp - lp.mean()) * (adv - adv.mean())
    selected, got = L.covariance_select(lp, adv, mode="kl_cov", frac=0.4)
    assert torch.allclose(got, cov, rtol=1e-14) and selected.tolist() == (cov >= cov.sort().values[-2]).tolist()
    torch.manual_seed(0)
    low, high = float(cov.sort().values[1]), float(cov.sort().values[-1])  # the middle three are candidates
    selected, _ = L.covariance_select(lp, adv, mode="clip_cov", frac=0.4, cov_low=low, cov_high=high)
    assert selected.sum() == 2 and bool(((cov > low) & (cov < high))[selected].all())
    selected, _ = L.covariance_select(lp, adv, mode="clip_cov", frac=0.4, cov_low=1.0, cov_high=1.0)
    assert not selected.any()
    assert L.covariance_select(lp, adv, mode="kl_cov")[0].sum() == 1  # at least one token


# --- G-OPD / ExOPD, top-k form ---------------------------------------------------------------------------------------


def _bucket_dist(gen: torch.Generator, n: int, k: int) -> torch.Tensor:
    """Log-probs over k + 1 buckets (float64), the last one the tail."""
    return torch.log_softmax(torch.randn(n, k + 1, generator=gen, dtype=torch.float64) * 2, -1)


def test_gopd_topk_target_identities():
    """q ~ p_T^lam p_ref^(1 - lam) over the buckets: a distribution; lam = 1 gives p_T, lam = 0 p_ref, p_ref = p_T
    makes lam irrelevant; and q maximises G-OPD's expected token reward sum_b p(b) [lam (lT - lref) - (lp - lref)]
    over the bucket distributions p (its maximum is log Z, reached at p = q only)."""
    gen = torch.Generator().manual_seed(0)
    teacher, ref = _bucket_dist(gen, 6, K), _bucket_dist(gen, 6, K)

    def q(lam, reference=ref):
        top, tail = L.gopd_topk_target(teacher[:, :-1], teacher[:, -1], reference[:, :-1], reference[:, -1], lam)
        return torch.cat([top, tail[:, None]], -1)

    for lam in (0.5, 1.25, 2.0):
        torch.testing.assert_close(q(lam).exp().sum(-1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(q(lam, reference=teacher), teacher, rtol=0, atol=1e-12)
    torch.testing.assert_close(q(1.0), teacher, rtol=0, atol=1e-12)
    torch.testing.assert_close(q(0.0), ref, rtol=0, atol=1e-12)
    lam = 1.25
    target = q(lam)

    def reward(logp):
        return (logp.exp() * (lam * (teacher - ref) - (logp - ref))).sum(-1)

    log_z = torch.logsumexp(lam * teacher + (1 - lam) * ref, -1)
    torch.testing.assert_close(reward(target), log_z, rtol=0, atol=1e-12)
    for _ in range(20):
        other = torch.log_softmax(target + 0.3 * torch.randn(target.shape, generator=gen, dtype=torch.float64), -1)
        assert (reward(other) < reward(target)).all()
