"""The methods as their papers (or the authors' released code) define them, each checked against a reference written
here from that source, never with the function under test: TIP's soft-OR and Q3-only scores and its entropy-mode
draw, BAPO's bound search (the released verl recipe, including its sum over ranks), IW-OPD's weights on the
sampled-token loss (TRL's ``_compute_iw_opd_loss``), GRPO's group advantage with the sample std (verl's
``compute_grpo_outcome_advantage``), Clip-Cov / KL-Cov's selection (verl's ``compute_policy_loss_clip_cov`` /
``_kl_cov``), PACED's zero weight through the trainer."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.train import losses as L
from pipeline.train.batching import TokenTargets, collate
from pipeline.train.head import TokenStats
from pipeline.train.objective import local_step_sums, micro_batch_loss, step_norms
from pipeline.train.selection import BapoBounds, CovSelection, Prepasses
from pipeline.train.student import StudentLM
from pipeline.train.weighting import (
    RolloutTable,
    tip_entropy_probs,
    tip_keep,
    tip_q3_only_scores,
    tip_soft_or_scores,
)
from storage.codecs import encode_records
from storage.prompt_stats import KV_KEY, STATS_FILE, compute_prompt_stats, load_prompt_stats
from storage.shardset import ShardSet
from storage.synthetic import make_records

VOCAB, K = 19, 4  # the tiny models' vocabulary
REPO = Path(__file__).resolve().parents[2]


def _rollouts(n_prompts: int, per_prompt: int, rewards, seed: int = 0):
    """Scored rollouts, ``per_prompt`` of each prompt ``p<g>``, ragged lengths (2..7 response tokens); rollout j
    of prompt g has reward ``rewards(g, j)``."""
    out = []
    records = make_records(VOCAB, K, num_rollouts=n_prompts * per_prompt, response_len=7, prompt_len=3, seed=seed)
    for i, r in enumerate(records):
        g, j = divmod(i, per_prompt)
        m = 2 + (5 * i) % 6
        out.append(dataclasses.replace(
            r, prompt_id=f"p{g}", sample_index=j, token_ids=r.token_ids[: r.prompt_len + m],
            teacher_logprobs=r.teacher_logprobs[:m], behavior_logprobs=r.behavior_logprobs[:m],
            topk_ids=r.topk_ids[:m], topk_logprobs=r.topk_logprobs[:m], tail_logprob=r.tail_logprob[:m],
            reward=float(rewards(g, j))))
    return out


def _shards(root: Path, records, per_shard: int = 5) -> ShardSet:
    s = ShardSet.create(root, "teacher_topk", {"k": K})
    for i in range(0, len(records), per_shard):
        s.write_shard(i // per_shard, encode_records(records[i: i + per_shard], "plain", K, VOCAB), row_group_size=2)
    s.finalize(expected_shards=math.ceil(len(records) / per_shard))
    return s


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(student="s", shards="d", out="o", logits_chunk_tokens=5, **kw)


def _trainer(student, cfg, batch, params, norms_batch=None):
    """The trainer's micro-batch loss, its gradients and metrics; the step's normalisers from ``norms_batch``
    (default: this batch alone)."""
    whole = batch if norms_batch is None else norms_batch
    mask = whole.mask_B_T.bool()
    tok, seq = mask.sum().double(), mask.any(-1).sum().double()
    norms = step_norms(cfg, tok, seq, torch.tensor(local_step_sums(cfg, [whole]), dtype=torch.float64))
    loss, metrics = micro_batch_loss(student, cfg, batch, norms.token, norms.seq, norms)
    return loss, torch.autograd.grad(loss, params, allow_unused=True), metrics


def _full_logits_view(lm, batch):
    """The student's quantities at the selected tokens from full logits, with plain torch (no lopd code): log p of
    the sampled token, log p at the teacher's top-k ids, the tail's log-mass, the full-vocabulary entropy."""
    mask = batch.mask_B_T.bool()
    logp_N_V = lm(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_B_L).logits[:, :-1][mask]
    logp_N_V = logp_N_V.double().log_softmax(-1)
    target_N = logp_N_V.gather(-1, batch.input_ids_B_L[:, 1:][mask][:, None]).squeeze(-1)
    topk_N_K = logp_N_V.gather(-1, batch.topk_ids_B_T_K[mask])
    tail_N = torch.log1p(-topk_N_K.exp().sum(-1).clamp_max(1 - 1e-15))
    entropy_N = -(logp_N_V.exp() * logp_N_V).sum(-1)
    return target_N, topk_N_K, tail_N, entropy_N


def _reverse_kl(student_N_B, teacher_N_B):
    return (student_N_B.exp() * (student_N_B - teacher_N_B.clamp_min(-30.0))).sum(-1)


@pytest.fixture(scope="module")
def tiny_lm(tiny_models):
    from pipeline.models import load_model

    return load_model(tiny_models["student"]).double()


# --- TIP --------------------------------------------------------------------------------------------------------------


def test_tip_soft_or_keeps_the_uncertain_and_the_confident_and_wrong():
    """The paper's two regions: high entropy OR (low entropy and high divergence). Reference by hand:
    h = (H - min H) / (max H - min H) (the 98th percentile caps nothing here), d likewise from D,
    score = 1 - (1 - h)(1 - d). The most uncertain token, which agrees with the teacher, is kept; Q3-only
    (low entropy, high divergence alone) scores it 0 and drops it."""
    entropy = [0.1, 0.1, 2.0, 2.0, 1.0]  # confident+wrong, confident+right, uncertain+wrong, uncertain+right, mid
    divergence = [3.0, 0.01, 3.0, 0.01, 1.0]
    h = [(x - 0.1) / 1.9 for x in entropy]
    d = [(x - 0.01) / 2.99 for x in divergence]
    want = [1 - (1 - a) * (1 - b) for a, b in zip(h, d)]
    got = tip_soft_or_scores(torch.tensor(entropy, dtype=torch.float64), torch.tensor(divergence, dtype=torch.float64))
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    assert tip_keep(got, 0.6, sample=False).tolist() == [True, False, True, True, False]
    q3 = tip_q3_only_scores(torch.tensor(entropy, dtype=torch.float64), torch.tensor(divergence, dtype=torch.float64))
    assert q3.tolist() == pytest.approx([(1 - a) * x for a, x in zip(h, divergence)], abs=1e-12)
    assert q3[3] == 0 and tip_keep(q3, 0.6, sample=False).tolist() == [True, True, False, False, True]
    # one axis constant: the OR reduces to the other axis
    flat = torch.ones(5, dtype=torch.float64)
    assert tip_soft_or_scores(flat, torch.tensor(divergence, dtype=torch.float64)).tolist() == pytest.approx(d)
    assert tip_soft_or_scores(torch.tensor(entropy, dtype=torch.float64), flat).tolist() == pytest.approx(h)


def test_tip_entropy_cap_is_the_98th_percentile():
    """One very uncertain token must not squash the others' h: H is capped at its 98th percentile (linear
    interpolation, numpy's default) before the min-max."""
    g = torch.Generator().manual_seed(0)
    entropy = torch.rand(60, generator=g, dtype=torch.float64)
    entropy[7] = 40.0
    divergence = torch.zeros(60, dtype=torch.float64)  # score = h
    cap = float(np.quantile(entropy.numpy(), 0.98))
    capped = np.minimum(entropy.numpy(), cap)
    want = (capped - capped.min()) / (capped.max() - capped.min())
    got = tip_soft_or_scores(entropy, divergence)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    assert got[7] == 1.0 and (got > 0.5).sum() > 20  # uncapped, every other token would sit below 1 / 40


def _successive_sampling_inclusion(w: list[float], keep: int) -> list[float]:
    """P(token i among ``keep`` draws without replacement, each draw proportional to w among those left), by
    enumerating the draw orders (the definition, for small N)."""
    import itertools

    total = [0.0] * len(w)
    for order in itertools.permutations(range(len(w)), keep):
        p, left = 1.0, sum(w)
        for i in order:
            p *= w[i] / left
            left -= w[i]
        for i in order:
            total[i] += p
    return total


def test_tip_entropy_mode_draws_tokens_with_the_probabilities_of_its_weights():
    """Entropy mode: ceil(rho N) tokens drawn without replacement, each draw ~ (H / ln V)^alpha (D / ln 2)^gamma.
    4,000 draws of 2 of 5 tokens: each token's empirical inclusion rate matches the exact inclusion probability of
    successive sampling (enumerated), within 4.5 standard errors."""
    entropy = torch.tensor([0.05, 0.5, 1.0, 2.0, 2.9], dtype=torch.float64)
    divergence = torch.tensor([0.6, 0.1, 0.4, 0.2, 0.05], dtype=torch.float64)
    alpha, gamma = 1.5, 0.5
    w = [(h / math.log(VOCAB)) ** alpha * (jsd / math.log(2.0)) ** gamma
         for h, jsd in zip(entropy.tolist(), divergence.tolist())]
    probs = tip_entropy_probs(entropy, divergence, VOCAB, alpha, gamma)
    assert probs.tolist() == pytest.approx(w, rel=1e-12)
    want = _successive_sampling_inclusion(w, 2)
    torch.manual_seed(0)
    draws = 4000
    counts = torch.zeros(5, dtype=torch.float64)
    for _ in range(draws):
        kept = tip_keep(probs, 0.4, sample=True)  # ceil(0.4 * 5) = 2
        assert int(kept.sum()) == 2
        counts += kept.double()
    for rate, p in zip((counts / draws).tolist(), want):
        assert abs(rate - p) < 4.5 * math.sqrt(p * (1 - p) / draws) + 1e-3, (rate, p)


# --- BAPO: the released code's bound search ---------------------------------------------------------------------------


def released_bapo_bounds(ratio, adv, lo=0.6, lo_max=0.8, hi=1.2, hi_max=2.0, step=0.05, target=1.0, eps=1e-8):
    """WooooDyy/BAPO recipe/bapo/policy_loss.py (``_compute_effective_advantage`` and the two search loops), in
    plain Python over one list of tokens (one rank)."""

    def pos_neg_ratio(lo, hi):
        pos = neg = 0.0
        for r, a in zip(ratio, adv):
            effective = (min(r, hi) if a >= 0 else max(r, lo)) * a
            pos += max(effective, 0.0)
            neg += max(-effective, 0.0)
        return math.inf if neg <= 0 else pos / (neg + eps)

    value = pos_neg_ratio(lo, hi)
    while value < target and lo < lo_max and step > 0:
        lo = min(lo + step, lo_max)
        value = pos_neg_ratio(lo, hi)
        if value >= target:
            break
    while value < target and hi < hi_max and step > 0:
        hi = min(hi + step, hi_max)
        value = pos_neg_ratio(lo, hi)
        if value >= target:
            break
    return lo, hi


def test_bapo_bounds_follow_the_released_search():
    """bapo_bounds against the released search on random tokens: same bounds on every case, many of which stop
    between the start and the maxima. A hand case where the earlier "surviving" rule differs: raising c_lo drops
    the token at r = 0.62 from N under it, but adds to N under the released clamped surrogate (max(r, c_lo) |A|),
    so the released search runs c_lo to its max and then c_hi to its max."""
    d = torch.float64
    moved = between = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        n = 30 + seed
        ratio = (0.6 * torch.randn(n, generator=g, dtype=d)).exp()
        adv = torch.randn(n, generator=g, dtype=d) - 0.6 * torch.rand((), generator=g, dtype=d)
        want = released_bapo_bounds(ratio.tolist(), adv.tolist())
        got = L.bapo_bounds(ratio, adv)
        assert got == pytest.approx(want, abs=1e-12), seed
        moved += want != (0.6, 1.2)
        between += 1.2 < want[1] < 2.0
    assert moved >= 10 and between >= 3
    ratio, adv = torch.tensor([1.0, 0.62, 0.9], dtype=d), torch.tensor([1.0, -1.0, -1.0], dtype=d)
    assert L.bapo_bounds(ratio, adv) == pytest.approx(released_bapo_bounds(ratio.tolist(), adv.tolist()))
    assert L.bapo_bounds(ratio, adv) == pytest.approx((0.8, 2.0))
    assert L.bapo_bounds(ratio, adv, balance="surviving") == pytest.approx((0.65, 1.2))
    # step 0 fixes the bounds; no negative contribution is balanced
    assert L.bapo_bounds(ratio, adv, step=0.0) == (0.6, 1.2)
    assert L.bapo_bounds(ratio, adv.abs()) == (0.6, 1.2)


def _bapo_rank(rank: int, world: int, init_file: str, out_dir: str, ratio: list, adv: list) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        half = len(ratio) // world
        mine = slice(rank * half, (rank + 1) * half)
        r, a = torch.tensor(ratio[mine], dtype=torch.float64), torch.tensor(adv[mine], dtype=torch.float64)
        summed = L.bapo_bounds(r, a)
        local = L.bapo_bounds(r, a, sum_ranks=False)
        Path(out_dir, f"rank{rank}.txt").write_text(repr((summed, local)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(300)
def test_bapo_bounds_sum_the_contributions_over_ranks(tmp_path):
    """Two gloo ranks holding half the tokens each take the bounds of the whole batch (the released code's
    all-reduce of P and N), not those of their own half."""
    g = torch.Generator().manual_seed(3)
    ratio = (0.5 * torch.randn(40, generator=g, dtype=torch.float64)).exp()
    adv = torch.randn(40, generator=g, dtype=torch.float64)
    adv[:20], ratio[:20] = adv[:20].abs(), ratio[:20] + 0.5  # rank 0: positive advantages, many above c_hi
    adv[20:] = -adv[20:].abs()  # rank 1: negative advantages only
    whole = released_bapo_bounds(ratio.tolist(), adv.tolist())
    assert 1.2 < whole[1] < 2.0
    torch.multiprocessing.start_processes(_bapo_rank, args=(2, str(tmp_path / "init"), str(tmp_path), ratio.tolist(),
                                                            adv.tolist()), nprocs=2, start_method="spawn")
    results = [eval((tmp_path / f"rank{r}.txt").read_text()) for r in range(2)]
    for summed, _ in results:
        assert summed == pytest.approx(whole, abs=1e-12)
    locals_ = [local for _, local in results]
    assert locals_[0] == (0.6, 1.2) and locals_[1] != pytest.approx(whole)  # the sum over ranks mattered


def test_bapo_through_the_trainer_against_the_released_loss(tiny_lm):
    """float64: the trainer's BAPO (pre-pass bounds, then lightning's PPO-clip at them) against a full-logits
    reference: A_t = lT - lth (detached), r_t = p_theta / mu, the released search's bounds, and the released
    surrogate max(-A r, -A clip(r, c_lo, c_hi)) as a token mean. The adapted bounds differ from the start, and the
    loss at the start bounds differs from the trainer's (the test sees the bounds)."""
    batch = collate(_rollouts(3, 4, lambda g, j: j % 2), pad_id=0)
    mask = batch.mask_B_T.bool()
    with torch.no_grad():  # ratios on both sides of 1 and advantages mostly < 0, so the bounds move
        own = _full_logits_view(tiny_lm, batch)[0].float()
    g = torch.Generator().manual_seed(0)
    batch.behavior_logprobs_B_T[mask] = own + 0.3 * torch.randn(own.shape, generator=g)
    batch.teacher_logprobs_B_T[mask] = own - 0.6 + 0.8 * torch.randn(own.shape, generator=g)
    params = list(tiny_lm.parameters())
    cfg = _cfg(losses={"lightning": 1.0}, lightning={"importance": "ppo_clip", "normalization": "token"},
               methods={"bapo": {}})
    loss, grads, metrics = _trainer(StudentLM(tiny_lm), cfg, batch, params)

    lth, _, _, _ = _full_logits_view(tiny_lm, batch)
    teacher, behavior = batch.teacher_logprobs_B_T[mask].double(), batch.behavior_logprobs_B_T[mask].double()
    adv = teacher - lth.detach()
    ratio = (lth - behavior).exp()
    lo, hi = released_bapo_bounds(ratio.detach().tolist(), adv.tolist())
    assert (lo, hi) != (0.6, 1.2)
    assert (metrics["bapo/clip_low"].item(), metrics["bapo/clip_high"].item()) == pytest.approx((lo, hi), abs=1e-6)

    def surrogate(lo, hi):
        return torch.maximum(-adv * ratio, -adv * ratio.clamp(lo, hi)).mean()

    ref = surrogate(lo, hi)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    assert abs(surrogate(0.6, 1.2).item() - ref.item()) > 1e-6
    for a, b in zip(grads, torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


# --- IW-OPD: position weights on the sampled-token loss ---------------------------------------------------------------


def test_iw_opd_ablation_row_is_trls_sampled_token_loss(tiny_lm):
    """The ablation's IW-OPD row trains lightning (the sampled-token loss) with the position weights and a token
    mean, which is TRL's IW-OPD loss, written here from ``_compute_iw_opd_loss``: a_t = lT - l_rollout,
    w_t = 1 + gamma (1 - (sum_{s<t} |a_s|) / max(sum_s |a_s|, 1e-8)), loss = sum_t -w_t a_t log p_theta(y_t) / N.
    On-policy (the stored behaviour log-probs are the student's own), the trainer's loss and gradients equal it."""
    from pipeline.config import RunConfig
    from pipeline.demo.ablate import load_ablate_config, row_train_config

    ablate = load_ablate_config(REPO / "configs" / "ablate.yaml")
    row = row_train_config(ablate, RunConfig(run_dir=Path("/nonexistent")),
                           "position weights, IW-OPD's form (lightning, token mean)", 0, Path("/nonexistent/a"),
                           {"policy_gradient": 1e-4, "topk": 1e-4, "sft": 3e-4})  # what a sweep chose
    assert row.losses == {"lightning": 1.0} and row.lightning.normalization == "token"
    assert row.lightning.importance == "none" and row.methods.position is not None
    assert "position weights, lopd's top-k extension (reverse_kl_topk)" in ablate.rows  # the earlier row stays
    cfg = _cfg(losses=row.losses, lightning=row.lightning, methods={"position": row.methods.position})

    batch = collate(_rollouts(2, 4, lambda g, j: j % 2), pad_id=0)
    mask = batch.mask_B_T.bool()
    with torch.no_grad():
        own, _, _, _ = _full_logits_view(tiny_lm, batch)
    batch.teacher_logprobs_B_T = batch.teacher_logprobs_B_T.double()
    batch.behavior_logprobs_B_T = batch.behavior_logprobs_B_T.double()
    batch.behavior_logprobs_B_T[mask] = own  # on-policy: mu is the current student
    params = list(tiny_lm.parameters())
    loss, grads, _ = _trainer(StudentLM(tiny_lm), cfg, batch, params)

    lth, _, _, _ = _full_logits_view(tiny_lm, batch)
    rows = mask.sum(-1).tolist()
    a_all = (batch.teacher_logprobs_B_T[mask] - batch.behavior_logprobs_B_T[mask]).double()
    gamma, terms, at = row.methods.position.gamma, [], 0
    for n in rows:
        a = a_all[at: at + n]
        prefix = a.abs().cumsum(0) - a.abs()
        w = 1.0 + gamma * (1.0 - prefix / a.abs().sum().clamp_min(1e-8))
        terms.append(-(lth[at: at + n] * w * a).sum())
        at += n
    ref = torch.stack(terms).sum() / mask.sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    for g_, r_ in zip(grads, torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(g_, r_, rtol=1e-7, atol=1e-10)


# --- KDRL: GRPO's group advantage -------------------------------------------------------------------------------------


def verl_grpo_advantage(scores: list[float], index: list[str], epsilon: float = 1e-6) -> list[float]:
    """verl's ``compute_grpo_outcome_advantage`` (norm_adv_by_std_in_grpo): per group, (s - mean) / (std + eps) with
    torch.std (the sample std); a lone rollout gets mean 0 and std 1."""
    groups: dict[str, list[float]] = {}
    for s, i in zip(scores, index):
        groups.setdefault(i, []).append(s)
    stats = {i: (0.0, 1.0) if len(v) == 1 else (float(torch.tensor(v).mean()), float(torch.tensor(v).std()))
             for i, v in groups.items()}
    return [(s - stats[i][0]) / (stats[i][1] + epsilon) for s, i in zip(scores, index)]


def test_group_advantage_uses_grpos_sample_std(tmp_path):
    """The prompt statistics' reward_std is the sample std and KDRL's Ahat equals verl's GRPO advantage (and
    differs from the population std's); a statistics file from before (no version) is recomputed."""
    reward_table = [[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [1.0, 1.0, 1.0], [0.2, 0.9, 0.4]]
    records = _rollouts(4, 3, lambda g, j: reward_table[g][j])
    shards = _shards(tmp_path / "s", records)
    table = compute_prompt_stats(shards)
    rollouts = RolloutTable.from_table(table)
    want = verl_grpo_advantage([r.reward for r in records], [r.prompt_id for r in records])
    got = rollouts.advantage_R[rollouts.rows([(r.prompt_id, r.sample_index) for r in records])]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    std = dict(zip(table["prompt_id"].to_pylist(), table["reward_std"].to_pylist()))
    for g, rewards in enumerate(reward_table):
        assert std[f"p{g}"] == pytest.approx(np.std(rewards, ddof=1), rel=1e-6)
        if np.std(rewards) > 0:
            assert np.std(rewards, ddof=1) != pytest.approx(np.std(rewards), rel=1e-3)  # the test sees the choice
    # a file written before the version key (population std) is not read back
    old = table.replace_schema_metadata({KV_KEY: b"k1"})
    pq.write_table(old, shards.root / STATS_FILE)
    assert load_prompt_stats(shards, "k1")[1] == "computed"
    assert load_prompt_stats(shards, "k1")[1] == "read"


# --- Clip-Cov / KL-Cov: verl's selection ------------------------------------------------------------------------------


def verl_clip_cov_selected(old_lp, lp, adv, mask, low, high, clip_cov_ratio, lb, ub):
    """verl ``compute_policy_loss_clip_cov`` (from PRIME-RL/Entropy-Mechanism-of-RL), its selection only: tokens
    whose PPO clip is active are out, then min(max(int(ratio N), 1), candidates) drawn by randperm; ``low``,
    ``high`` the ratio bounds (1 - cliprange_low, 1 + cliprange_high)."""
    ratio = torch.exp(lp - old_lp)
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, low, high)
    clip_by_origin = (pg_losses2 > pg_losses1) & (mask > 0)
    masked_mean = lambda x: (x * mask).sum() / mask.sum()
    cov_all = (adv - masked_mean(adv)) * (lp - masked_mean(lp))
    cov_all[mask == 0] = -torch.inf
    cov_all[clip_by_origin] = -torch.inf
    clip_num = max(int(clip_cov_ratio * mask.sum().item()), 1)
    top_k_idx = torch.nonzero((cov_all < ub) & (cov_all > lb) & (mask > 0))
    if len(top_k_idx) > 0:
        perm = torch.randperm(len(top_k_idx))
        top_k_idx = top_k_idx[perm[: min(clip_num, len(top_k_idx))]]
    else:
        top_k_idx = torch.empty((0, 2), dtype=torch.long)
    corr = torch.ones_like(adv)
    corr[top_k_idx[:, 0], top_k_idx[:, 1]] = 0
    return corr == 0


def verl_kl_cov_selected(lp, adv, mask, kl_cov_ratio):
    """verl ``compute_policy_loss_kl_cov``, its selection only: the top max(1, int(N ratio)) valid tokens by Cov
    (none when no token is valid)."""
    all_valid = mask > 0
    all_valid_idx = torch.nonzero(all_valid.reshape(-1), as_tuple=True)[0]
    a, logp = adv[all_valid].reshape(-1), lp[all_valid].reshape(-1)
    selected = torch.zeros(adv.numel(), dtype=torch.bool)
    k = min(kl_cov_ratio, len(a))
    if k != 0:
        cov = (a - a.mean()) * (logp - logp.mean())
        idx = torch.topk(cov, max(1, int(len(cov) * kl_cov_ratio)), largest=True).indices
        selected[all_valid_idx[idx]] = True
    return selected.reshape(adv.shape)


def _cov_targets(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    student = -2.0 * torch.rand(n, generator=g, dtype=torch.float64)
    teacher = student + 1.5 * torch.randn(n, generator=g, dtype=torch.float64) - 0.5  # A mostly < 0: BAPO moves
    behavior = student + 0.4 * torch.randn(n, generator=g, dtype=torch.float64)
    targets = TokenTargets(teacher_logprobs_N=teacher.float(), behavior_logprobs_N=behavior.float(),
                           topk_ids_N_K=torch.zeros(n, K, dtype=torch.long), topk_logprobs_N_K=torch.full((n, K), -2.0),
                           tail_logprob_N=torch.full((n,), -1.0), seq_weights_N=torch.ones(n))
    return student, targets


@pytest.mark.parametrize("bapo", [False, True])
def test_clip_cov_selection_is_verls_under_ppo_clip(bapo):
    """The trainer's Clip-Cov pre-pass (``CovSelection``) with lightning's PPO-clip picks exactly verl's tokens from
    the same generator state: PPO-clipped tokens (at BAPO's adapted bounds when BAPO is on) are never drawn; the
    count is max(1, int(frac N))."""
    n = 400
    student, targets = _cov_targets(n, seed=5)
    methods = {"cov": {"mode": "clip_cov", "frac": 0.05, "cov_low": 0.05, "cov_high": 3.0}}
    if bapo:
        methods["bapo"] = {}
    cfg = _cfg(losses={"lightning": 1.0}, lightning={"importance": "ppo_clip", "normalization": "token"},
               methods=methods)
    cov = CovSelection(cfg, targets)
    parts = [BapoBounds(cfg, targets), cov] if bapo else [cov]
    prepasses = Prepasses(parts, targets)
    prepasses.chunk(TokenStats(student), 0, n)
    torch.manual_seed(11)
    prepasses.done()
    got = targets.pg_keep_N == 0

    low, high = parts[0].bounds if bapo else (1 - cfg.lightning.clip_eps_low, 1 + cfg.lightning.clip_eps_high)
    if bapo:
        assert (low, high) != (0.6, 1.2)
    adv = targets.teacher_logprobs_N.double() - student
    behavior = targets.behavior_logprobs_N.double()
    torch.manual_seed(11)
    want = verl_clip_cov_selected(behavior[None], student[None], adv[None], torch.ones(1, n), low, high, 0.05, 0.05,
                                  3.0)[0]
    assert int(want.sum()) == int(0.05 * n) and torch.equal(got, want)
    ratio = (student - behavior).exp()
    clipped = ratio.clamp(low, high) * adv < ratio * adv
    assert clipped.any() and not (got & clipped).any()


@pytest.mark.parametrize("n", [0, 1, 3, 4999, 5000, 5001, 12345])
def test_kl_cov_selects_verls_count_and_tokens(n):
    """KL-Cov picks the top max(1, int(frac N)) tokens by covariance, none when there is no token: verl's rule
    (frac 2e-4: 1 token up to N = 9,999, 2 from 10,000)."""
    g = torch.Generator().manual_seed(n)
    lp = -3.0 * torch.rand(n, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    got, _ = L.covariance_select(lp, adv, mode="kl_cov", frac=2e-4)
    want = verl_kl_cov_selected(lp[None], adv[None], torch.ones(1, n), 2e-4)[0]
    assert int(got.sum()) == (0 if n == 0 else max(1, int(n * 2e-4)))
    assert torch.equal(got, want)


# --- PACED: zero weight through the trainer ---------------------------------------------------------------------------


def test_paced_rows_of_always_or_never_solved_prompts_add_nothing_through_the_trainer(tiny_lm, tmp_path):
    """Through micro_batch_loss (method_weights included): the loss and gradients of the whole batch equal those of
    its rows whose prompt is sometimes solved (0 < p < 1), under the whole step's normalisers; the rows of prompts
    solved always or never give loss 0 and zero gradients. The weights' mean over tokens is the reference
    sum_rows n_i w_i / sum_rows n_i with w_i = p(1 - p) / mean_rows p(1 - p), computed by hand."""
    passes = [1, 2, 4, 0]  # of 4 rollouts: pass rates 0.25, 0.5, 1, 0
    records = _rollouts(4, 4, lambda g, j: j < passes[g])
    shards = _shards(tmp_path / "s", records)
    rollouts = RolloutTable.from_table(compute_prompt_stats(shards))
    batch = collate(records, 0, rollouts)
    cfg = _cfg(losses={"lightning": 1.0, "reverse_kl_topk": 1.0}, lightning={"normalization": "token"},
               methods={"paced": {}})
    params = list(tiny_lm.parameters())
    student = StudentLM(tiny_lm)
    loss, grads, metrics = _trainer(student, cfg, batch, params)

    p = [passes[int(r.prompt_id[1:])] / 4 for r in records]
    kernel = [x * (1 - x) for x in p]
    n_tok = batch.mask_B_T.sum(-1).tolist()
    scale = len(kernel) / sum(kernel)
    assert metrics["weights/paced_mean"].item() == pytest.approx(
        sum(k * scale * n for k, n in zip(kernel, n_tok)) / sum(n_tok), rel=1e-6)

    def rows(keep):
        index = torch.tensor([i for i, x in enumerate(p) if keep(x)])
        return dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[index] for f in dataclasses.fields(batch)
                                             if getattr(batch, f.name) is not None})

    mixed_loss, mixed_grads, _ = _trainer(student, cfg, rows(lambda x: 0 < x < 1), params, norms_batch=batch)
    assert loss.item() == pytest.approx(mixed_loss.item(), rel=1e-9) and abs(loss.item()) > 1e-3
    for a, b in zip(grads, mixed_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    pure_loss, pure_grads, _ = _trainer(student, cfg, rows(lambda x: x in (0.0, 1.0)), params, norms_batch=batch)
    assert pure_loss.item() == 0.0
    assert all(g is None or torch.count_nonzero(g) == 0 for g in pure_grads)
