"""pipeline/train/objective.py: the micro-batch loss with the methods (docs/methods.md). Every method at its
neutral setting gives today's loss and gradients bit for bit; per-token weights and their normalisers
(weight_norm: sum), per-term row routing, PACED's zero-weight rows, diagnostics, SCOPE's routing, the anchors'
solved rows, OPSD's unreachable clip and G-OPD's top-k form against float64 references."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline.config import TOPK_LOSSES, TrainConfig
from pipeline.train import losses as L
from pipeline.train.batching import collate, flatten_targets
from pipeline.train.head import token_stats
from pipeline.train.objective import compute_losses, local_step_sums, method_weights, micro_batch_loss, step_norms
from pipeline.train.student import StudentLM
from pipeline.train.weighting import RolloutTable, route_mask
from storage.prompt_stats import load_prompt_stats
from tests.train.helpers import K, grouped_records, prefixed_records, train_cfg

# --- "today's" trainer loss, frozen: the reference every method's neutral setting must reproduce bit for bit ------


def _today_compute_losses(cfg, stats, targets, mask_B_T, token_normalizer, seq_normalizer):
    terms = {}
    for name, weight in cfg.losses.items():
        if weight == 0:
            continue
        if name in TOPK_LOSSES:
            extra = {"beta": cfg.jsd_beta} if name == "jsd_topk" else {}
            terms[name] = getattr(L, name)(stats.topk_logprobs, stats.tail_logprob, targets.topk_logprobs_N_K,
                                           targets.tail_logprob_N, mask_B_T, tail_bucket=cfg.tail_bucket,
                                           normalizer=token_normalizer, **extra)
        elif name == "lightning":
            lc = cfg.lightning
            sequence = lc.normalization == "sequence"
            terms[name] = L.lightning_pg(
                stats.target_logprobs, targets.teacher_logprobs_N, targets.behavior_logprobs_N, mask_B_T,
                importance=lc.importance, is_cap=lc.is_cap, clip_eps_low=lc.clip_eps_low,
                clip_eps_high=lc.clip_eps_high, advantage_clip=lc.advantage_clip, normalization=lc.normalization,
                normalizer=seq_normalizer if sequence else token_normalizer,
                weights_B_T=targets.seq_weights_N if sequence else None)
        elif name == "sft":
            terms[name] = L.sft_cross_entropy(stats.target_logprobs, mask_B_T, normalizer=token_normalizer)
    return L.combined_loss(terms, {name: cfg.losses[name] for name in terms})


def _today_micro_batch_loss(model, cfg, batch, token_normalizer, seq_normalizer):
    select_B_T = batch.mask_B_T.bool()
    targets = flatten_targets(batch)
    need_topk = bool(set(cfg.losses) & TOPK_LOSSES)

    def chunk_loss(stats, start, end):
        valid_1_n = torch.ones(1, end - start, dtype=torch.bool)
        return _today_compute_losses(cfg, stats[None], targets.rows(start, end), valid_1_n, token_normalizer,
                                     seq_normalizer)

    return model(batch.input_ids_B_L, batch.attention_B_L, select_B_T, chunk_loss,
                 topk_ids_N_K=targets.topk_ids_N_K if need_topk else None, chunk_tokens=cfg.logits_chunk_tokens)


@pytest.fixture(scope="module")
def tiny_student(tiny_models):
    from pipeline.models import load_model

    return load_model(tiny_models["student"])


LOSS_SETS = {
    "lightning": ({"lightning": 1.0}, {}),
    "lightning_token_ppo": ({"lightning": 1.0}, {"importance": "ppo_clip", "normalization": "token"}),
    "reverse_kl_topk": ({"reverse_kl_topk": 1.0}, {}),
    "mixed": ({"reverse_kl_topk": 1.0, "lightning": 0.1, "sft": 0.5}, {}),
}


NEUTRAL = {
    "default": {},
    "paced": {"methods": {"paced": {"alpha": 0.0, "beta": 0.0}}},
    "position": {"methods": {"position": {"gamma": 0.0}}},
    "gopd": {"methods": {"gopd": {"lam": 1.0, "k3_guard": 0.0}}},
    "rows_all": {"rows": {"lightning": "all", "sft": "all", "reverse_kl_topk": "all"}},
    "all_at_once": {"methods": {"paced": {"alpha": 0.0, "beta": 0.0}, "position": {"gamma": 0.0},
                                "gopd": {"lam": 1.0}}},
    # a weighted mean with all-ones weights: the sums of the weights are the counts
    "weight_norm_sum": {"weight_norm": "sum", "methods": {"paced": {"alpha": 0.0, "beta": 0.0},
                                                          "position": {"gamma": 0.0}}},
    # the new losses at weight 0 (AKL, alpha-divergence, DPH-RL anchors) and their parameters changed
    "new_losses_off": {"akl_head_mass": 0.3, "alpha_divergence": 0.7},
}


NEW_LOSSES_OFF = {"akl_topk": 0.0, "alpha_topk": 0.0, "anchor_forward_kl": 0.0, "anchor_js": 0.0, "anchor_alpha": 0.0,
                  "kdrl": 0.0}


@pytest.mark.parametrize("losses", list(LOSS_SETS))
@pytest.mark.parametrize("method", list(NEUTRAL))
def test_each_method_at_its_neutral_setting_is_todays_loss_bit_for_bit(method, losses, stats_shards, tiny_student):
    """The trainer's micro-batch loss (chunked head, 7-token chunks) with a method at its neutral setting equals
    the frozen pre-methods loss exactly: torch.equal on the loss and on every parameter gradient."""
    weights, lightning = LOSS_SETS[losses]
    base = dict(losses=weights, lightning=lightning, logits_chunk_tokens=7)
    cfg = train_cfg(**base, **NEUTRAL[method])
    if method == "new_losses_off":
        cfg = train_cfg(**{**base, "losses": {**weights, **NEW_LOSSES_OFF}}, **NEUTRAL[method])
    rollouts = RolloutTable.from_table(load_prompt_stats(stats_shards, "k")[0]) if cfg.needs_prompt_stats() else None
    records = grouped_records()
    batch = collate(records, pad_id=0, rollouts=rollouts)
    mask = batch.mask_B_T.bool()
    tok, seq = mask.sum().float(), mask.any(-1).sum().float()
    student = StudentLM(tiny_student)
    params = list(tiny_student.parameters())

    ref, _ = _today_micro_batch_loss(student, train_cfg(**base), batch, tok, seq)
    ref_grads = torch.autograd.grad(ref, params)
    norms = step_norms(cfg, tok, seq, torch.tensor(local_step_sums(cfg, [batch]), dtype=torch.float64))
    got, metrics = micro_batch_loss(student, cfg, batch, tok, seq, norms)
    grads = torch.autograd.grad(got, params)
    assert abs(ref.item()) > 1e-3
    assert torch.equal(got, ref)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    if method in ("paced", "position", "all_at_once"):
        assert metrics["weights/mean"].item() == 1.0 and metrics["weights/token_max"].item() == 1.0
        for name in ("paced", "position"):
            if f"weights/{name}_mean" in metrics:
                assert [metrics[f"weights/{name}_{s}"].item() for s in ("mean", "token_max", "kept")] == [1, 1, 1]


# --- weights, routing, normalisers ----------------------------------------------------------------------------------


def _double_student(tiny_models):
    from pipeline.models import load_model

    return StudentLM(load_model(tiny_models["student"]).double())


def _step_grads(student, cfg, batches):
    """One step's gradients, micro-batches each normalised by the step's global counts (as ``train_step``)."""
    tok = sum(b.mask_B_T.sum() for b in batches).double()
    seq = sum(b.mask_B_T.any(-1).sum() for b in batches).double()
    sums = torch.tensor(np.sum([local_step_sums(cfg, [b]) for b in batches], axis=0), dtype=torch.float64)
    norms = step_norms(cfg, tok, seq, sums)
    student.zero_grad()
    total = 0.0
    for b in batches:
        loss, _ = micro_batch_loss(student, cfg, b, norms.token, norms.seq, norms)
        loss.backward()
        total += loss.item()
    return total, [p.grad.clone() for p in student.parameters()]


def test_weight_norm_sum_is_the_weighted_mean_and_accumulation_invariant(tiny_models, stats_shards):
    """``weight_norm: sum``: each term is sum_t w_t l_t / sum_t w_t over its (routed) tokens, the sequence form
    sum_i sum_t (w_t / T_i) l_t / sum_i mean_t w_t; against a float64 reference computed from the per-token losses,
    and one micro-batch equals four (the sums are the step's)."""
    rollouts = RolloutTable.from_table(load_prompt_stats(stats_shards, "k")[0])
    records = grouped_records()[:8]  # pass rates 0.25 and 0.5: PACED weights differ between the prompts
    student = _double_student(tiny_models)
    methods = {"paced": {}, "position": {"gamma": 0.5}}
    for losses, lightning, rows in (({"sft": 1.0}, {}, {}), ({"sft": 1.0}, {}, {"sft": "correct"}),
                                    ({"lightning": 1.0}, {"normalization": "sequence"}, {})):
        cfg = train_cfg(losses=losses, lightning=lightning, rows=rows, methods=methods, weight_norm="sum")
        batch = collate(records, 0, rollouts)
        got, grads = _step_grads(student, cfg, [batch])
        split = _step_grads(student, cfg, [collate(records[i:i + 2], 0, rollouts) for i in range(0, 8, 2)])
        assert split[0] == pytest.approx(got, rel=1e-12)
        for a, b in zip(grads, split[1]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)
        # the reference: per-token loss l_t (sft: -log p; lightning at theta = mu with importance none: the same
        # -A_t log p value, A_t = lT - log p) from the student's log-probs, weighted by PACED's kernel x position
        from pipeline.train.objective import method_weights
        w_B_T, _ = method_weights(cfg, batch, torch.ones(()))
        with torch.no_grad():
            logits = student.lm(batch.input_ids_B_L.long(), attention_mask=batch.attention_B_L).logits.double()
        logp_B_T = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids_B_L[:, 1:, None].long())[..., 0]
        valid = batch.mask_B_T.bool()
        if rows:
            valid = valid & route_mask("correct", batch.reward_B, batch.pass_rate_B).unsqueeze(-1)
        w = torch.where(valid, w_B_T.double(), 0.0)
        if "sft" in losses:
            ref = (w * -logp_B_T).sum() / w.sum()
        else:
            adv = batch.teacher_logprobs_B_T.double() - logp_B_T
            per_seq = (w * -adv * logp_B_T).sum(-1) / batch.mask_B_T.sum(-1).clamp_min(1)
            ref = per_seq.sum() / (w.sum(-1) / batch.mask_B_T.sum(-1).clamp_min(1)).sum()
        assert got == pytest.approx(ref.item(), rel=1e-6), (losses, rows)  # the advantage is float32 in the loss


def test_routing_masks_and_routed_normalisers(tiny_models, stats_shards):
    """A term routed to correct rows equals the same loss computed on those rows alone (normalised by their
    tokens); incorrect rows get no gradient from it."""
    rollouts = RolloutTable.from_table(load_prompt_stats(stats_shards, "k")[0])
    records = grouped_records()
    correct = [r for r in records if r.reward > 0]
    student = _double_student(tiny_models)
    routed = _step_grads(student, train_cfg(losses={"sft": 1.0}, rows={"sft": "correct"}),
                         [collate(records, 0, rollouts)])
    alone = _step_grads(student, train_cfg(losses={"sft": 1.0}), [collate(correct, 0)])
    assert routed[0] == pytest.approx(alone[0], rel=1e-12)
    for a, b in zip(routed[1], alone[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_paced_rows_of_solved_prompts_get_no_gradient(stats_shards):
    """Under alpha = beta = 1, the trainer's weights (``method_weights``, as ``micro_batch_loss`` makes them) equal a
    reference by hand, w_i = p_i (1 - p_i) / mean_rows p (1 - p) per row (mean 1 over the step's rows); rows whose
    prompt has pass rate 1 (or 0) carry weight 0: no gradient reaches their tokens."""
    from pipeline.train.head import TokenStats

    rollouts = RolloutTable.from_table(load_prompt_stats(stats_shards, "k")[0])
    cfg = train_cfg(losses={"lightning": 1.0, "reverse_kl_topk": 1.0}, lightning={"normalization": "token"},
               methods={"paced": {}})
    records = grouped_records()
    batch = collate(records, 0, rollouts)
    assert sorted(set(batch.pass_rate_B.tolist())) == [0.25, 0.5, 1.0]
    tok, seq = batch.mask_B_T.sum().double(), batch.mask_B_T.any(-1).sum().double()
    norms = step_norms(cfg, tok, seq, torch.tensor(local_step_sums(cfg, [batch]), dtype=torch.float64))
    weights_B_T, _ = method_weights(cfg, batch, norms.paced_scale)
    pass_rate = {f"q{g}": [0.25, 0.5, 1.0, 0.0][g % 4] for g in range(3)}
    kernel = [pass_rate[r.prompt_id] * (1 - pass_rate[r.prompt_id]) for r in records]
    want = [k * len(kernel) / sum(kernel) for k in kernel]
    for i, w in enumerate(want):
        row = weights_B_T[i][batch.mask_B_T[i].bool()]
        assert row.tolist() == pytest.approx([w] * len(row), rel=1e-6)
    # the gradient through the per-token stats: zero on every token of the solved prompt's rows
    stats_lp = torch.randn(int(batch.mask_B_T.sum()), dtype=torch.float64, requires_grad=True)
    targets = flatten_targets(batch, weights_B_T)
    n = stats_lp.shape[0]
    topk = torch.randn(n, K, dtype=torch.float64).log_softmax(-1) - 0.1
    topk.requires_grad_(True)
    stats = TokenStats(stats_lp, topk, torch.log1p(-topk.exp().sum(-1)))
    loss, _ = compute_losses(cfg, stats[None], targets.rows(0, n), torch.ones(1, n, dtype=torch.bool), tok, seq)
    loss.backward()
    solved = targets.pass_rate_N == 1.0
    assert solved.any() and (~solved).any()
    assert torch.all(stats_lp.grad[solved] == 0) and torch.all(topk.grad[solved] == 0)
    assert stats_lp.grad[~solved].abs().sum() > 0


# --- diagnostics -----------------------------------------------------------------------------------------------------


def test_diagnostics_against_full_logit_references(tiny_models):
    """drift (E_mu[rho log rho]), student mass in the teacher's top-k and top-1 agreement, merged over chunks of
    the trainer's head, equal the same quantities from full logits; drift is 0 when the student is the rollout
    policy."""
    from pipeline.models import load_model

    lm = load_model(tiny_models["student"]).double()
    records = grouped_records()
    batch = collate(records, 0)
    mask = batch.mask_B_T.bool()
    logits = lm(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_B_L).logits[:, :-1][mask].detach()
    targets = batch.input_ids_B_L[:, 1:][mask]
    tt = flatten_targets(batch)
    logp = logits.log_softmax(-1)
    lth = logp.gather(-1, targets[:, None])[:, 0]
    cfg = train_cfg(losses={"reverse_kl_topk": 1.0}, logits_chunk_tokens=5)
    _, metrics = micro_batch_loss(StudentLM(lm), cfg, batch, mask.sum().double(), mask.any(-1).sum().double())
    rho = (lth - tt.behavior_logprobs_N.double()).exp()
    assert metrics["diag/drift_kl"].item() == pytest.approx((rho * rho.log()).mean().item(), rel=1e-5)
    mass = logp.gather(-1, tt.topk_ids_N_K).exp().sum(-1).mean()
    assert metrics["diag/student_topk_mass"].item() == pytest.approx(mass.item(), rel=1e-6)
    agree = (logits.argmax(-1) == tt.topk_ids_N_K[:, 0]).double().mean()
    assert metrics["diag/top1_agree"].item() == pytest.approx(agree.item(), abs=1e-7)
    # the student as the rollout policy: no drift
    at_mu = dataclasses.replace(tt, behavior_logprobs_N=lth.float())
    stats = token_stats(logits, targets, tt.topk_ids_N_K)
    _, m = compute_losses(cfg, stats[None], at_mu.rows(0, len(targets)), torch.ones(1, len(targets), dtype=torch.bool),
                          mask.sum().double(), mask.any(-1).sum().double())
    assert abs(m["diag/drift_kl"].item()) < 1e-6


# --- SCOPE, anchors ---------------------------------------------------------------------------------------------------


def test_scope_routes_distillation_to_incorrect_and_mle_to_correct_rollouts(tiny_models, stats_shards):
    """SCOPE on, losses lightning + sft: lightning reads only incorrect rollouts, weighted by teacher confidence and
    normalised by their sequences; sft only correct ones, weighted by the rollout policy's, normalised by their
    tokens: the loss equals the two terms computed by hand on the separate subsets (float64, full logits)."""
    from pipeline.models import load_model

    table = load_prompt_stats(stats_shards, "k")[0]
    cfg = train_cfg(losses={"lightning": 1.0, "sft": 0.5}, methods={"scope": {}})
    assert (cfg.route("lightning"), cfg.route("sft"), cfg.route("anchor_js")) == ("incorrect", "correct", "solved")
    rollouts = RolloutTable.from_table(table, (1.0, -1))
    records = grouped_records()
    batch = collate(records, 0, rollouts)
    mask = batch.mask_B_T.bool()
    lm = load_model(tiny_models["student"]).double()
    tok, seq = mask.sum().double(), mask.any(-1).sum().double()
    norms = step_norms(cfg, tok, seq, torch.tensor(local_step_sums(cfg, [batch]), dtype=torch.float64))
    loss, metrics = micro_batch_loss(StudentLM(lm), cfg, batch, tok, seq, norms)

    logits = lm(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_B_L).logits[:, :-1]
    lth = torch.where(mask, logits.log_softmax(-1).gather(-1, batch.input_ids_B_L[:, 1:, None])[..., 0], 0.0).detach()
    lt = batch.teacher_logprobs_B_T.double()
    keys = list(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist()))
    tmean, bmean = table["teacher_mean"].to_numpy(), table["behavior_mean"].to_numpy()
    ref_l = ref_s = 0.0
    incorrect = [b for b, r in enumerate(records) if r.reward <= 0]
    correct = [b for b, r in enumerate(records) if r.reward > 0]
    n_tok_correct = sum(int(mask[b].sum()) for b in correct)
    for b, r in enumerate(records):
        mates = [i for i, k in enumerate(keys) if k[0] == r.prompt_id
                 and (table["reward"][i].as_py() > 0) == (r.reward > 0)]
        score = [(-bmean[i] if r.reward > 0 else tmean[i]) for i in mates]
        me = keys.index((r.prompt_id, r.sample_index))
        w = len(mates) * math.exp(score[mates.index(me)]) / sum(math.exp(x) for x in score)
        n = int(mask[b].sum())
        if b in incorrect:
            adv = lt[b] - lth[b]
            ref_l += w * float((-(adv * lth[b])[mask[b]]).sum()) / n / len(incorrect)
        else:
            ref_s += w * float((-lth[b][mask[b]]).sum()) / n_tok_correct
    assert incorrect and correct
    # SCOPE's weights are stored in float32 and the metrics are float32
    assert metrics["loss/lightning"].item() == pytest.approx(ref_l, rel=1e-6)
    assert metrics["loss/sft"].item() == pytest.approx(ref_s, rel=1e-6)
    assert loss.item() == pytest.approx(ref_l + 0.5 * ref_s, rel=1e-6)


def test_anchors_train_on_solved_prompts_only(tiny_models, stats_shards):
    """An anchor term with the default routing reads only the rows of prompts the rollout policy always solves,
    normalised by their tokens: equal to the anchor on those rows alone."""
    rollouts = RolloutTable.from_table(load_prompt_stats(stats_shards, "k")[0])
    records = grouped_records()
    solved = [r for r in records if r.prompt_id == "q2"]  # pass rate 1
    student = _double_student(tiny_models)
    cfg = train_cfg(losses={"anchor_js": 1.0})
    routed = _step_grads(student, cfg, [collate(records, 0, rollouts)])
    alone = _step_grads(student, train_cfg(losses={"anchor_js": 1.0}, rows={"anchor_js": "all"}), [collate(solved, 0)])
    assert abs(routed[0]) > 1e-6 and routed[0] == pytest.approx(alone[0], rel=1e-12)
    for a, b in zip(routed[1], alone[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


# --- OPSD ------------------------------------------------------------------------------------------------------------


def test_opsd_unreachable_clip_is_todays_trainer_loss_bit_for_bit(tiny_models):
    """Through the trainer's chunked head: methods.opsd with a cap no token reaches gives the loss and the
    gradients of the run without it, exactly."""
    from pipeline.models import load_model

    student_model = load_model(tiny_models["student"])
    student, params = StudentLM(student_model), list(student_model.parameters())
    batch = collate(prefixed_records("q", 8), pad_id=0)
    mask = batch.mask_B_T.bool()
    tok, seq = mask.sum().float(), mask.any(-1).sum().float()
    out = []
    for methods in ({}, {"opsd": {"clip": 1e30}}):
        cfg = TrainConfig(student="s", shards="d", out="o", losses={"reverse_kl_topk": 1.0, "lightning": 0.1},
                          logits_chunk_tokens=7, methods=methods)
        norms = step_norms(cfg, tok, seq, torch.tensor(local_step_sums(cfg, [batch]), dtype=torch.float64))
        loss, _ = micro_batch_loss(student, cfg, batch, tok, seq, norms)
        out.append((loss, torch.autograd.grad(loss, params)))
    (ref, ref_grads), (got, grads) = out
    assert abs(ref.item()) > 1e-3 and torch.equal(got, ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))


# --- G-OPD / ExOPD, top-k form ---------------------------------------------------------------------------------------


def _gopd_models(tiny_models):
    from pipeline.models import load_model

    student = StudentLM(load_model(tiny_models["student"]).double())
    reference = StudentLM(load_model(tiny_models["teacher"]).double()).eval().requires_grad_(False)
    return student, reference


def test_gopd_topk_trainer_loss_against_a_float64_reference(tiny_models):
    """The trainer's reverse_kl_topk toward G-OPD's q, with the reference model's log-probs at the teacher's ids
    from its own no-grad chunked forward, equals the loss and gradients computed from both models' full float64
    logits; lam = 1 with a reference is today's loss bit for bit; lam != 1 without one is refused."""
    student, reference = _gopd_models(tiny_models)
    params = list(student.parameters())
    batch = collate(prefixed_records("q", 8), pad_id=0)
    lam = 1.5
    cfg = TrainConfig(student="s", shards="d", out="o", losses={"reverse_kl_topk": 1.0}, logits_chunk_tokens=7,
                      methods={"gopd": {"lam": lam}})
    mask = batch.mask_B_T.bool()
    tok, seq = mask.sum().double(), mask.any(-1).sum().double()
    got, metrics = micro_batch_loss(student, cfg, batch, tok, seq, None, reference)
    got_grads = torch.autograd.grad(got, params)

    ids = batch.input_ids_B_L.long()
    logits = student.lm(ids, attention_mask=batch.attention_B_L).logits[:, :-1]
    with torch.no_grad():
        ref_logits = reference.lm(ids, attention_mask=batch.attention_B_L).logits[:, :-1]
    topk_ids = batch.topk_ids_B_T_K.long()
    s_top, s_tail = L.student_topk_tail_logprobs(logits, topk_ids)
    r_top, r_tail = L.student_topk_tail_logprobs(ref_logits, topk_ids)
    unnorm = (lam * torch.cat([batch.topk_logprobs_B_T_K, batch.tail_logprob_B_T[..., None]], -1).double()
              + (1 - lam) * torch.cat([r_top, r_tail[..., None]], -1).clamp_min(L.REVERSE_KL_TEACHER_FLOOR))
    q = unnorm - unnorm.logsumexp(-1, keepdim=True)
    want, _ = L.reverse_kl_topk(s_top, s_tail, q[..., :-1], q[..., -1], batch.mask_B_T, normalizer=tok)
    want_grads = torch.autograd.grad(want, params)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-11)
    assert metrics["gopd/kl_q_teacher"].item() > 1e-4

    plain = TrainConfig(student="s", shards="d", out="o", losses={"reverse_kl_topk": 1.0}, logits_chunk_tokens=7)
    base, _ = micro_batch_loss(student, plain, batch, tok, seq)
    neutral = plain.model_copy(update={"methods": plain.methods.model_copy(update={"gopd": cfg.methods.gopd.model_copy(
        update={"lam": 1.0})})})
    same, _ = micro_batch_loss(student, neutral, batch, tok, seq, None, reference)
    assert torch.equal(same, base)
    with pytest.raises(ValueError, match="needs the reference model"):
        micro_batch_loss(student, cfg, batch, tok, seq)
