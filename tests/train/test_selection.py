"""pipeline/train/selection.py: the head's pre-passes through the trainer. TIP token selection (rho = 1 is
today's loss; soft-OR and Q3-only against a full-logits reference selection; entropy sampling is reproducible and
draws what a full-logits reference draws), BAPO's adaptive bounds, Clip-Cov and KL-Cov."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.train import losses as L
from pipeline.train.batching import collate
from pipeline.train.objective import local_step_sums, micro_batch_loss, step_norms
from pipeline.train.student import StudentLM
from tests.train.helpers import prefixed_records


def _trainer_loss(student, cfg, batch, params):
    mask = batch.mask_B_T.bool()
    tok, seq = mask.sum().to(torch.float64), mask.any(-1).sum().to(torch.float64)
    norms = step_norms(cfg, tok, seq, torch.tensor(local_step_sums(cfg, [batch]), dtype=torch.float64))
    loss, metrics = micro_batch_loss(student, cfg, batch, tok, seq, norms)
    return loss, torch.autograd.grad(loss, params), metrics


# --- TIP token selection ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["soft_or", "q3_only", "entropy"])
@pytest.mark.parametrize("losses", [{"lightning": 1.0}, {"reverse_kl_topk": 1.0}, {"reverse_kl_topk": 1.0,
                                                                                     "lightning": 0.1, "sft": 0.5}])
def test_tip_with_rho_one_is_todays_loss_bit_for_bit(mode, losses, tiny_models):
    """rho = 1 runs the pre-pass and keeps every token with weight 1: the loss and gradients of the run without
    TIP, exactly (chunked head, 7-token chunks)."""
    from pipeline.models import load_model

    lm = load_model(tiny_models["student"])
    student, params = StudentLM(lm), list(lm.parameters())
    batch = collate(prefixed_records("q", 8), pad_id=0)
    ref = _trainer_loss(student, TrainConfig(student="s", shards="d", out="o", losses=losses, logits_chunk_tokens=7),
                        batch, params)
    got = _trainer_loss(student, TrainConfig(student="s", shards="d", out="o", losses=losses, logits_chunk_tokens=7,
                                             methods={"tip": {"mode": mode, "rho": 1.0, "gamma": 1.0}}), batch, params)
    assert abs(ref[0].item()) > 1e-3 and torch.equal(got[0], ref[0])
    assert all(torch.equal(a, b) for a, b in zip(got[1], ref[1], strict=True))
    assert got[2]["weights/tip_kept"].item() == 1.0


def _full_logits_tip_view(lm, batch):
    """From full logits with plain torch (none of lopd's head code): each selected token's full-vocabulary entropy
    and its student and teacher bucket log-probs (the teacher's top-k ids, then the tail)."""
    mask = batch.mask_B_T.bool()
    logp = lm(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_B_L).logits[:, :-1][mask]
    logp = logp.double().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    topk = logp.gather(-1, batch.topk_ids_B_T_K[mask])
    student_b = torch.cat([topk, torch.log1p(-topk.exp().sum(-1))[:, None]], -1)
    teacher_b = torch.cat([batch.topk_logprobs_B_T_K[mask], batch.tail_logprob_B_T[mask][:, None]], -1).double()
    return entropy, student_b, teacher_b


def _tip_reference_keep(mode: str, entropy: np.ndarray, divergence: np.ndarray, rho: float) -> np.ndarray:
    """TIP's rules written out in numpy: Hc = min(H, q98(H)), h = minmax(Hc), d = minmax(D); soft_or keeps the top
    ceil(rho N) by 1 - (1 - h)(1 - d) (uncertain OR confident-and-wrong), q3_only by (1 - h) D."""
    capped = np.minimum(entropy, np.quantile(entropy, 0.98))
    h = (capped - capped.min()) / (capped.max() - capped.min())
    d = (divergence - divergence.min()) / (divergence.max() - divergence.min())
    score = 1 - (1 - h) * (1 - d) if mode == "soft_or" else (1 - h) * divergence
    return np.sort(np.argsort(-score, kind="stable")[: math.ceil(rho * len(score))])


@pytest.mark.parametrize("mode", ["soft_or", "q3_only"])
def test_tip_score_selection_against_a_full_logits_reference(mode, tiny_models):
    """float64: the trainer's chunked pre-pass + loss equals the loss computed from full logits over the tokens an
    independent reference selects (entropy and bucket reverse KL per token from full logits, the score and top
    ceil(rho N) in numpy; kept tokens weighted N / kept): loss and gradients. The soft-OR keeps the most uncertain
    token, Q3-only does not."""
    from pipeline.models import load_model

    lm = load_model(tiny_models["student"]).double()
    student, params = StudentLM(lm), list(lm.parameters())
    batch = collate(prefixed_records("q", 8), pad_id=0)
    cfg = TrainConfig(student="s", shards="d", out="o", losses={"reverse_kl_topk": 1.0}, logits_chunk_tokens=5,
                      methods={"tip": {"mode": mode, "rho": 0.3}})
    loss, grads, metrics = _trainer_loss(student, cfg, batch, params)

    entropy, student_b, teacher_b = _full_logits_tip_view(lm, batch)
    kl = (student_b.exp() * (student_b - teacher_b.clamp_min(L.REVERSE_KL_TEACHER_FLOOR))).sum(-1)
    n = kl.numel()
    kept = torch.from_numpy(_tip_reference_keep(mode, entropy.detach().numpy(), kl.detach().numpy(), 0.3))
    keep = len(kept)
    assert (int(entropy.argmax()) in kept.tolist()) == (mode == "soft_or")
    ref = kl[kept].sum() * (n / keep) / n
    ref_grads = torch.autograd.grad(ref, params)
    # the token weights are float32 (as the other methods'), so N / kept carries float32 rounding
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert metrics["weights/tip_kept"].item() == pytest.approx(keep / n)
    assert metrics["tip/kept_entropy_mean"].item() == pytest.approx(entropy[kept].mean().item(), rel=1e-5)


def test_tip_entropy_mode_samples_by_entropy_reproducibly(tiny_models):
    """Entropy mode keeps ceil(rho N) tokens drawn without replacement with probability ~ (H / ln V)^alpha
    (JS / ln 2)^gamma, from torch's generator: the same seed gives the same selection (and loss), another seed
    another; and against full logits, the trainer's loss and gradients are those of the tokens torch.multinomial
    draws from the same generator state with weights computed here (entropy and the buckets' Jensen-Shannon
    divergence from full logits), weighted N / kept."""
    from pipeline.models import load_model
    from pipeline.train.weighting import tip_entropy_probs

    lm = load_model(tiny_models["student"]).double()
    student, params = StudentLM(lm), list(lm.parameters())
    batch = collate(prefixed_records("q", 8), pad_id=0)
    cfg = TrainConfig(student="s", shards="d", out="o", losses={"reverse_kl_topk": 1.0}, logits_chunk_tokens=5,
                      methods={"tip": {"rho": 0.5}})
    losses = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        loss, _, metrics = _trainer_loss(student, cfg, batch, params)
        losses.append(loss.item())
        n = int(batch.mask_B_T.sum())
        assert metrics["weights/tip_kept"].item() == pytest.approx(math.ceil(0.5 * n) / n)
    assert losses[0] == losses[1] != losses[2]
    h = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    d = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    want = (h / math.log(19)) ** 2 * (d / math.log(2)) ** 0.5
    assert torch.allclose(tip_entropy_probs(h, d, 19, 2.0, 0.5), want, rtol=1e-14)

    alpha, gamma, rho = 1.5, 0.5, 0.3
    cfg = TrainConfig(student="s", shards="d", out="o", losses={"reverse_kl_topk": 1.0}, logits_chunk_tokens=5,
                      methods={"tip": {"rho": rho, "alpha": alpha, "gamma": gamma}})
    torch.manual_seed(7)
    loss, grads, metrics = _trainer_loss(student, cfg, batch, params)
    entropy, student_b, teacher_b = _full_logits_tip_view(lm, batch)
    p_s, p_t = student_b.exp(), teacher_b.exp()
    mix = 0.5 * (p_s + p_t)

    def kl_to_mix(p):
        return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - mix.log()), 0.0).sum(-1)

    js = 0.5 * kl_to_mix(p_t) + 0.5 * kl_to_mix(p_s)
    weights = (entropy / math.log(lm.config.vocab_size)) ** alpha * (js / math.log(2.0)) ** gamma
    n = entropy.numel()
    keep = math.ceil(rho * n)
    torch.manual_seed(7)
    kept = torch.multinomial(weights.detach(), keep, replacement=False)
    kl = (p_s * (student_b - teacher_b.clamp_min(L.REVERSE_KL_TEACHER_FLOOR))).sum(-1)
    ref = kl[kept].sum() * (n / keep) / n
    assert metrics["tip/kept_entropy_mean"].item() == pytest.approx(entropy[kept].mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(grads, torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --- BAPO ------------------------------------------------------------------------------------------------------------


def test_bapo_neutral_is_ppo_clip_bit_for_bit_and_adapts_through_the_trainer(tiny_models):
    """Fixed bounds equal to PPO's (step 0) give the plain PPO-clip loss and gradients exactly; the default
    adapts per micro-batch and logs its bounds."""
    from pipeline.models import load_model

    lm = load_model(tiny_models["student"])
    student, params = StudentLM(lm), list(lm.parameters())
    batch = collate(prefixed_records("q", 8), pad_id=0)
    base = dict(student="s", shards="d", out="o", losses={"lightning": 1.0, "reverse_kl_topk": 0.5},
                logits_chunk_tokens=7, lightning={"importance": "ppo_clip", "normalization": "token"})
    ref = _trainer_loss(student, TrainConfig(**base), batch, params)
    neutral = {"low": 0.8, "low_max": 0.8, "high": 1.28, "high_max": 1.28, "step": 0.0}
    got = _trainer_loss(student, TrainConfig(**base, methods={"bapo": neutral}), batch, params)
    assert abs(ref[0].item()) > 1e-3 and torch.equal(got[0], ref[0])
    assert all(torch.equal(a, b) for a, b in zip(got[1], ref[1], strict=True))
    adapted = _trainer_loss(student, TrainConfig(**base, methods={"bapo": {}}), batch, params)[2]
    assert 0.6 <= adapted["bapo/clip_low"].item() <= 0.8 and 1.2 <= adapted["bapo/clip_high"].item() <= 2.0
    with pytest.raises(ValueError, match="lightning.importance=ppo_clip"):
        TrainConfig(student="s", shards="d", out="o", methods={"bapo": {}})


# --- Clip-Cov / KL-Cov -----------------------------------------------------------------------------------------------


def test_clip_cov_and_kl_cov_through_the_trainer(tiny_models):
    """Neutral settings (kl_coef 0; an empty covariance range) are today's loss bit for bit; Clip-Cov over every
    token leaves lightning no gradient; KL-Cov over every token adds kl_coef |log p_theta - log mu| to each token
    (float64, against the formula on full logits)."""
    from pipeline.models import load_model

    lm = load_model(tiny_models["student"])
    student, params = StudentLM(lm), list(lm.parameters())
    batch = collate(prefixed_records("q", 8), pad_id=0)
    base = dict(student="s", shards="d", out="o", losses={"lightning": 1.0}, logits_chunk_tokens=7,
                lightning={"normalization": "token"})
    ref = _trainer_loss(student, TrainConfig(**base), batch, params)
    for cov in ({"mode": "kl_cov", "kl_coef": 0.0}, {"mode": "clip_cov", "cov_low": 1.0, "cov_high": 1.0}):
        got = _trainer_loss(student, TrainConfig(**base, methods={"cov": cov}), batch, params)
        assert torch.equal(got[0], ref[0]) and all(torch.equal(a, b) for a, b in zip(got[1], ref[1], strict=True))

    lm64 = load_model(tiny_models["student"]).double()
    student64, params64 = StudentLM(lm64), list(lm64.parameters())
    everything = {"mode": "clip_cov", "frac": 1.0, "cov_low": -1e9, "cov_high": 1e9}
    loss, grads, metrics = _trainer_loss(student64, TrainConfig(**base, methods={"cov": everything}), batch,
                                         params64)
    assert loss.item() == 0.0 and all(torch.all(g == 0) for g in grads)
    assert metrics["cov/selected_frac"].item() == 1.0
    loss, grads, _ = _trainer_loss(student64, TrainConfig(**base, methods={"cov": {"mode": "kl_cov", "frac": 1.0,
                                                                                    "kl_coef": 0.25}}),
                                   batch, params64)
    mask = batch.mask_B_T.bool()
    logits = lm64(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_B_L).logits[:, :-1]
    lth = logits.log_softmax(-1).gather(-1, batch.input_ids_B_L[:, 1:, None])[..., 0][mask]
    teacher, behavior = batch.teacher_logprobs_B_T[mask].double(), batch.behavior_logprobs_B_T[mask].double()
    ref = (-(teacher - lth.detach()) * lth + 0.25 * (lth - behavior).abs()).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for g, r in zip(grads, torch.autograd.grad(ref, params64), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-14)
