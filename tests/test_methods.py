"""The offline OPD methods (docs/methods.md) and their shared layer: prompt statistics beside the shards, per-token
weights in the loss reduction, per-term row routing, the loss schedule, diagnostics. Every method at its neutral
setting gives today's loss and gradients bit for bit; the identities of each against float64 references on tiny
random tensors; accumulation invariance with weights; one `lopd train` run with the methods on."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import TOPK_LOSSES, TrainConfig
from pipeline.stages.train import rollout_table, train_run_key
from pipeline.train import checkpoint
from pipeline.train import losses as L
from pipeline.train.batching import collate, flatten_targets
from pipeline.train.head import token_stats
from pipeline.train.objective import compute_losses, local_step_sums, micro_batch_loss, step_norms
from pipeline.train.student import StudentLM
from pipeline.train.weighting import RolloutTable, mean_one, paced_kernel, position_weights, route_mask, scope_weights
from storage.codecs import encode_records
from storage.errors import LopdUserError
from storage.prompt_stats import STATS_FILE, compute_prompt_stats, load_prompt_stats
from storage.shardset import ShardSet
from storage.synthetic import make_records

VOCAB, K = 19, 4  # the demo world's vocabulary (the tiny models')


def _records(n_prompts: int = 3, per_prompt: int = 4, seed: int = 0, reward: bool = True):
    """Synthetic rollouts, ``per_prompt`` of each prompt, ragged lengths; rewards chosen so the prompts have pass
    rates 0.25, 0.5, 1, 0, ... in turn (reward None when not ``reward``)."""
    records = make_records(VOCAB, K, num_rollouts=n_prompts * per_prompt, response_len=7, prompt_len=3, seed=seed)
    passes = [1, 2, 4, 0]
    out = []
    for i, r in enumerate(records):
        g, j = divmod(i, per_prompt)
        m = 2 + (5 * i) % 6  # 2..7 response tokens
        out.append(dataclasses.replace(
            r, prompt_id=f"q{g}", sample_index=j, token_ids=r.token_ids[: r.prompt_len + m],
            teacher_logprobs=r.teacher_logprobs[:m], behavior_logprobs=r.behavior_logprobs[:m], topk_ids=r.topk_ids[:m],
            topk_logprobs=r.topk_logprobs[:m], tail_logprob=r.tail_logprob[:m],
            reward=(float(j < passes[g % 4] * per_prompt // 4) if reward else None)))
    return out


def _shard_set(root, records, per_shard: int = 5) -> ShardSet:
    """A finished teacher top-k set of these records, ``per_shard`` per shard in row groups of 2."""
    s = ShardSet.create(root, "teacher_topk", {"k": K})
    for i in range(0, len(records), per_shard):
        s.write_shard(i // per_shard, encode_records(records[i: i + per_shard], "plain", K, VOCAB), row_group_size=2)
    s.finalize(expected_shards=math.ceil(len(records) / per_shard))
    return s


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(student="s", shards="d", out="o", **kw)


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
def stats_shards(tmp_path_factory) -> ShardSet:
    return _shard_set(tmp_path_factory.mktemp("methods") / "shards", _records())


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
    cfg = _cfg(**base, **NEUTRAL[method])
    if method == "new_losses_off":
        cfg = _cfg(**{**base, "losses": {**weights, **NEW_LOSSES_OFF}}, **NEUTRAL[method])
    rollouts = RolloutTable.from_table(load_prompt_stats(stats_shards, "k")[0]) if cfg.needs_prompt_stats() else None
    records = _records()
    batch = collate(records, pad_id=0, rollouts=rollouts)
    mask = batch.mask_B_T.bool()
    tok, seq = mask.sum().float(), mask.any(-1).sum().float()
    student = StudentLM(tiny_student)
    params = list(tiny_student.parameters())

    ref, _ = _today_micro_batch_loss(student, _cfg(**base), batch, tok, seq)
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


# --- prompt statistics --------------------------------------------------------------------------------------------


def test_prompt_stats_values_against_the_records(stats_shards):
    records = _records()
    table = compute_prompt_stats(stats_shards)
    assert table.num_rows == len(records)
    keys = zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist())
    rows = {key: i for i, key in enumerate(keys)}
    col = {name: table[name].to_numpy() for name in table.column_names if name != "prompt_id"}
    for r in records:
        i = rows[(r.prompt_id, r.sample_index)]
        group = [x for x in records if x.prompt_id == r.prompt_id]
        rewards = np.array([x.reward for x in group], dtype=np.float64)
        assert col["n_rollouts"][i] == len(group) == 4
        assert col["reward"][i] == r.reward
        assert col["num_tokens"][i] == len(r.teacher_logprobs)
        assert col["pass_rate"][i] == pytest.approx(rewards.mean())
        assert col["reward_mean"][i] == pytest.approx(rewards.mean())
        assert col["reward_std"][i] == pytest.approx(rewards.std(), abs=1e-7)
        assert col["teacher_mean"][i] == pytest.approx(np.mean(r.teacher_logprobs.astype(np.float64)), rel=1e-6)
        assert col["behavior_mean"][i] == pytest.approx(np.mean(r.behavior_logprobs.astype(np.float64)), rel=1e-6)
    assert sorted(set(col["pass_rate"].tolist())) == [0.25, 0.5, 1.0]


def test_prompt_stats_are_written_once_reused_and_recomputed_for_a_changed_set(tmp_path):
    shards = _shard_set(tmp_path / "s", _records())
    cfg = _cfg(methods={"paced": {}})
    table, how = load_prompt_stats(shards, "data-1")
    assert how == "computed" and (tmp_path / "s" / STATS_FILE).exists()
    assert pq.read_table(tmp_path / "s" / STATS_FILE).schema.metadata[b"lopd.prompt_stats_key"] == b"data-1"
    mtime = (tmp_path / "s" / STATS_FILE).stat().st_mtime_ns
    again, how = load_prompt_stats(shards, "data-1")
    assert how == "read" and again.equals(table) and (tmp_path / "s" / STATS_FILE).stat().st_mtime_ns == mtime
    assert load_prompt_stats(shards, "data-2")[1] == "computed"  # another fingerprint: recomputed
    assert shards.problems() == []  # the stats file does not disturb the set's integrity checks
    assert rollout_table(cfg, shards, "data-2").pass_rate_R.shape == (12,)
    assert rollout_table(_cfg(), shards, "data-2") is None  # nothing reads them: not even opened


def test_prompt_stats_that_cannot_be_stored_are_computed_and_used(tmp_path):
    """Where the file cannot be written (here a directory occupies its name, which fails for any user, root
    included; a read-only shard directory fails the same way for others), the statistics are still returned."""
    shards = _shard_set(tmp_path / "s", _records())
    (tmp_path / "s" / STATS_FILE).mkdir()
    (tmp_path / "s" / STATS_FILE / "not-parquet").write_text("x")
    table, how = load_prompt_stats(shards, "data-1")
    assert how.startswith("computed (not stored: ")
    assert table.equals(compute_prompt_stats(shards).replace_schema_metadata(table.schema.metadata))
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "s").iterdir())


def test_methods_that_read_rewards_refuse_null_rewards_and_single_rollout_prompts(tmp_path):
    null = _shard_set(tmp_path / "null", _records(reward=False))
    with pytest.raises(LopdUserError, match=rf"{tmp_path / 'null'}.*train.methods.paced needs each rollout's reward"):
        rollout_table(_cfg(methods={"paced": {}}), null, "x")
    with pytest.raises(LopdUserError, match=r"train.rows.sft=correct needs each rollout's reward"):
        rollout_table(_cfg(losses={"lightning": 1.0, "sft": 0.1}, rows={"sft": "correct"}), null, "x")
    single = _shard_set(tmp_path / "single", _records(n_prompts=4, per_prompt=1))
    with pytest.raises(LopdUserError, match=rf"{tmp_path / 'single'}.*train.methods.paced compares the rollouts"):
        rollout_table(_cfg(methods={"paced": {}}), single, "x")
    with pytest.raises(LopdUserError, match=r"train.rows.lightning=solved compares"):
        rollout_table(_cfg(rows={"lightning": "solved"}), single, "x")
    correctness = _cfg(losses={"lightning": 1.0, "sft": 0.1}, rows={"sft": "correct"})
    assert rollout_table(correctness, single, "x") is not None  # correctness needs no group
    with pytest.raises(LopdUserError, match=r"train.methods.scope compares"):
        rollout_table(_cfg(methods={"scope": {}}), single, "x")
    with pytest.raises(LopdUserError, match=r"anchor_js \(on solved rows\) compares"):
        rollout_table(_cfg(losses={"lightning": 1.0, "anchor_js": 0.1}), single, "x")


def test_lopd_train_refuses_them_in_one_line_before_any_work(tmp_path, tiny_models):
    """Through the CLI: exit code 2, one line naming the shard set, the option and the fix; no run directory."""
    from typer.testing import CliRunner

    from lopd.cli import app

    null = _shard_set(tmp_path / "null", _records(reward=False))
    single = _shard_set(tmp_path / "single", _records(n_prompts=4, per_prompt=1))
    cases = [(null, "{paced: {}}", ["train.methods.paced needs each rollout's reward", "12 of 12 rollouts have none",
                                    "rollouts.checker"]),
             (single, "{scope: {}}", ["train.methods.scope compares the rollouts of each prompt",
                                      "4 prompt(s) have fewer than 2", "rollouts.sampling.n >= 2"])]
    for shards, methods, parts in cases:
        cfg = tmp_path / "run.yaml"
        cfg.write_text(f"run_dir: {tmp_path / 'run'}\ntrain:\n  student: {tiny_models['student']}\n"
                       f"  shards: {shards.root}\n  steps: 2\n  batch_size: 4\n  methods: {methods}\n")
        result = CliRunner().invoke(app, ["train", "-c", str(cfg), "-q"])
        err = " ".join(result.stderr.split())
        assert result.exit_code == 2 and err.startswith(f"error: {shards.root}:") and "Traceback" not in err, err
        assert all(part in err for part in parts), err
        assert not (tmp_path / "run" / "train").exists()


# --- the shared layer: weights, routing, normalisers, schedule, run key ----------------------------------------------


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


class _ListSource:
    """A batch source over a fixed list of records (the trainer's ``BatchSource`` protocol)."""

    def __init__(self, records):
        self.records = records

    def next_records(self, n: int, parts: int):
        return self.records[:n]

    def state_dict(self):
        return {}


def test_accumulation_invariance_with_weights_and_routing(tiny_models, stats_shards):
    """``train_step`` with non-trivial weights (PACED, position, G-OPD with its guard and top-k form) and routed
    terms: one micro-batch of 8 and 8 micro-batches of 1 give the same loss and the same update (float64, SGD with
    lr 1, so the update is the gradient), because every normaliser and the PACED scale are the step's global
    sums."""
    from pipeline.models import load_model
    from pipeline.train.distributed import DistInfo
    from pipeline.train.loop import train_step
    from pipeline.train.metrics import StepMeter

    rollouts = RolloutTable.from_table(load_prompt_stats(stats_shards, "k")[0])
    records = _records()[4:]  # prompts with pass rates 0.5 and 1 (the latter weigh 0 under PACED)
    # G-OPD's top-k form reads a frozen reference (here the teacher model) for reverse_kl_topk's target
    reference = StudentLM(load_model(tiny_models["teacher"]).double()).eval().requires_grad_(False)
    results = []
    for accum in (1, 8):
        cfg = _cfg(losses={"lightning": 1.0, "reverse_kl_topk": 0.5, "sft": 0.3},
                   rows={"sft": "correct", "reverse_kl_topk": "unsolved"}, batch_size=8, grad_accum=accum,
                   optim={"grad_clip": None},
                   methods={"paced": {}, "position": {"gamma": 0.5}, "gopd": {"lam": 1.25, "k3_guard": 0.1}})
        student = StudentLM(load_model(tiny_models["student"]).double())
        before = [p.detach().clone() for p in student.parameters()]
        opt = torch.optim.SGD(student.parameters(), lr=1.0)
        metrics, _ = train_step(student, opt, cfg, _ListSource(records), 8, 0, DistInfo(), torch.device("cpu"),
                                StepMeter(1, 1), rollouts, reference)
        results.append((metrics, [b - p.detach() for b, p in zip(before, student.parameters())]))
    (one, one_update), (many, many_update) = results
    assert abs(one["loss/total"].item()) > 1e-3
    assert one["weights/paced_kept"].item() < 1.0 < one["weights/paced_token_max"].item()
    for key in ("loss/total", "loss/lightning", "loss/reverse_kl", "loss/sft"):
        assert many[key].item() == pytest.approx(one[key].item(), rel=1e-10), key
    for a, b in zip(one_update, many_update):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_weight_norm_sum_is_the_weighted_mean_and_accumulation_invariant(tiny_models, stats_shards):
    """``weight_norm: sum``: each term is sum_t w_t l_t / sum_t w_t over its (routed) tokens, the sequence form
    sum_i sum_t (w_t / T_i) l_t / sum_i mean_t w_t; against a float64 reference computed from the per-token losses,
    and one micro-batch equals four (the sums are the step's)."""
    rollouts = RolloutTable.from_table(load_prompt_stats(stats_shards, "k")[0])
    records = _records()[:8]  # pass rates 0.25 and 0.5: PACED weights differ between the prompts
    student = _double_student(tiny_models)
    methods = {"paced": {}, "position": {"gamma": 0.5}}
    for losses, lightning, rows in (({"sft": 1.0}, {}, {}), ({"sft": 1.0}, {}, {"sft": "correct"}),
                                    ({"lightning": 1.0}, {"normalization": "sequence"}, {})):
        cfg = _cfg(losses=losses, lightning=lightning, rows=rows, methods=methods, weight_norm="sum")
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
    records = _records()
    correct = [r for r in records if r.reward > 0]
    student = _double_student(tiny_models)
    routed = _step_grads(student, _cfg(losses={"sft": 1.0}, rows={"sft": "correct"}), [collate(records, 0, rollouts)])
    alone = _step_grads(student, _cfg(losses={"sft": 1.0}), [collate(correct, 0)])
    assert routed[0] == pytest.approx(alone[0], rel=1e-12)
    for a, b in zip(routed[1], alone[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_route_mask_definitions():
    reward = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0])
    pass_rate = torch.tensor([1.0, 0.5, 0.5, 0.0, 1.0])
    assert route_mask("all", reward, pass_rate).tolist() == [True] * 5
    assert route_mask("correct", reward, pass_rate).tolist() == [True, False, True, False, True]
    assert route_mask("incorrect", reward, pass_rate).tolist() == [False, True, False, True, False]
    assert route_mask("solved", reward, pass_rate).tolist() == [True, False, False, False, True]
    assert route_mask("unsolved", reward, pass_rate).tolist() == [False, True, True, True, False]


def test_loss_schedule_phases_and_run_key():
    cfg = _cfg(losses={"reverse_kl_topk": 1.0}, loss_schedule=[{"until_step": 3, "losses": {"forward_kl_topk": 1.0}},
                                                               {"until_step": 5, "losses": {"jsd_topk": 1.0}}])
    assert [next(iter(cfg.losses_at(s))) for s in (1, 3, 4, 5, 6, 100)] == [
        "forward_kl_topk", "forward_kl_topk", "jsd_topk", "jsd_topk", "reverse_kl_topk", "reverse_kl_topk"]
    assert cfg.all_losses() == {"reverse_kl_topk", "forward_kl_topk", "jsd_topk"}
    with pytest.raises(ValueError, match="until_step must increase"):
        _cfg(loss_schedule=[{"until_step": 5, "losses": {"sft": 1.0}}, {"until_step": 5, "losses": {"sft": 1.0}}])
    # the key of a run without methods is what it was before they existed; each method setting changes it
    plain = _cfg()
    settings = {k: v for k, v in plain.model_dump(mode="json").items()
                if k not in {"out", "student", "shards", "steps", "checkpoint_every", "keep_checkpoints", "log_every",
                             "online", "loss_schedule", "rows", "methods", "akl_head_mass", "alpha_divergence",
                             "kdrl_beta", "kdrl_is_cap", "weight_norm"}
                | TrainConfig.EXECUTION_ONLY}
    assert train_run_key(plain, "m", "d") == checkpoint.run_fingerprint({"settings": settings, "student": "m",
                                                                         "data": "d"})
    keys = {train_run_key(c, "m", "d") for c in (
        plain, cfg, _cfg(loss_schedule=[{"until_step": 3, "losses": {"forward_kl_topk": 1.0}}]),
        _cfg(rows={"sft": "correct"}), _cfg(methods={"paced": {}}), _cfg(methods={"paced": {"alpha": 2.0}}),
        _cfg(methods={"position": {}}), _cfg(methods={"gopd": {}}), _cfg(methods={"scope": {}}),
        _cfg(akl_head_mass=0.3), _cfg(alpha_divergence=0.5), _cfg(kdrl_beta=1e-3), _cfg(kdrl_is_cap=3.0),
        _cfg(methods={"tip": {}}), _cfg(methods={"opsd": {"clip": 1.0}}),
        _cfg(methods={"paced": {}}, weight_norm="sum"))}
    assert len(keys) == 16


# --- PACED ---------------------------------------------------------------------------------------------------------


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


def test_paced_rows_of_solved_prompts_get_no_gradient(stats_shards):
    """Under alpha = beta = 1, rows whose prompt has pass rate 1 (or 0) carry weight 0: no gradient reaches their
    tokens; the weights have mean 1 over the step's rows."""
    rollouts = RolloutTable.from_table(load_prompt_stats(stats_shards, "k")[0])
    cfg = _cfg(losses={"lightning": 1.0, "reverse_kl_topk": 1.0}, lightning={"normalization": "token"},
               methods={"paced": {}})
    batch = collate(_records(), 0, rollouts)
    assert sorted(set(batch.pass_rate_B.tolist())) == [0.25, 0.5, 1.0]
    tok, seq = batch.mask_B_T.sum().double(), batch.mask_B_T.any(-1).sum().double()
    norms = step_norms(cfg, tok, seq, torch.tensor(local_step_sums(cfg, [batch]), dtype=torch.float64))
    weights = paced_kernel(batch.pass_rate_B, 1.0, 1.0) * norms.paced_scale
    assert weights[batch.mask_B_T.any(-1)].double().mean().item() == pytest.approx(1.0, rel=1e-6)
    # the gradient through the per-token stats: zero on every token of the solved prompt's rows
    stats_lp = torch.randn(int(batch.mask_B_T.sum()), dtype=torch.float64, requires_grad=True)
    targets = flatten_targets(batch, (weights.unsqueeze(-1) * torch.ones_like(batch.mask_B_T, dtype=torch.float32)))
    from pipeline.train.head import TokenStats

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


# --- position weighting --------------------------------------------------------------------------------------------


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


# --- G-OPD / ExOPD ---------------------------------------------------------------------------------------------------


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


# --- diagnostics -----------------------------------------------------------------------------------------------------


def test_diagnostics_against_full_logit_references(tiny_models):
    """drift (E_mu[rho log rho]), student mass in the teacher's top-k and top-1 agreement, merged over chunks of
    the trainer's head, equal the same quantities from full logits; drift is 0 when the student is the rollout
    policy."""
    from pipeline.models import load_model

    lm = load_model(tiny_models["student"]).double()
    records = _records()
    batch = collate(records, 0)
    mask = batch.mask_B_T.bool()
    logits = lm(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_B_L).logits[:, :-1][mask].detach()
    targets = batch.input_ids_B_L[:, 1:][mask]
    tt = flatten_targets(batch)
    logp = logits.log_softmax(-1)
    lth = logp.gather(-1, targets[:, None])[:, 0]
    cfg = _cfg(losses={"reverse_kl_topk": 1.0}, logits_chunk_tokens=5)
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


# --- SCOPE -----------------------------------------------------------------------------------------------------------


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


def test_scope_routes_distillation_to_incorrect_and_mle_to_correct_rollouts(tiny_models, stats_shards):
    """SCOPE on, losses lightning + sft: lightning reads only incorrect rollouts, weighted by teacher confidence and
    normalised by their sequences; sft only correct ones, weighted by the rollout policy's, normalised by their
    tokens: the loss equals the two terms computed by hand on the separate subsets (float64, full logits)."""
    from pipeline.models import load_model

    table = load_prompt_stats(stats_shards, "k")[0]
    cfg = _cfg(losses={"lightning": 1.0, "sft": 0.5}, methods={"scope": {}})
    assert (cfg.route("lightning"), cfg.route("sft"), cfg.route("anchor_js")) == ("incorrect", "correct", "solved")
    rollouts = RolloutTable.from_table(table, (1.0, -1))
    records = _records()
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


def test_anchors_train_on_solved_prompts_only(tiny_models, stats_shards):
    """An anchor term with the default routing reads only the rows of prompts the rollout policy always solves,
    normalised by their tokens: equal to the anchor on those rows alone."""
    rollouts = RolloutTable.from_table(load_prompt_stats(stats_shards, "k")[0])
    records = _records()
    solved = [r for r in records if r.prompt_id == "q2"]  # pass rate 1
    student = _double_student(tiny_models)
    cfg = _cfg(losses={"anchor_js": 1.0})
    routed = _step_grads(student, cfg, [collate(records, 0, rollouts)])
    alone = _step_grads(student, _cfg(losses={"anchor_js": 1.0}, rows={"anchor_js": "all"}), [collate(solved, 0)])
    assert abs(routed[0]) > 1e-6 and routed[0] == pytest.approx(alone[0], rel=1e-12)
    for a, b in zip(routed[1], alone[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


# --- end to end ------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_lopd_train_with_methods_on_real_shards(tmp_path, trained_models):
    """Stages 1-3 with the arithmetic checker on the rollouts (rewards in the shards), then `lopd train` with the
    loss schedule, SCOPE's routing, a DPH-RL anchor, PACED, position weighting and G-OPD on: it trains, logs the
    diagnostics and weight statistics every step, writes the prompt statistics beside the shards once and reuses
    them."""
    from pipeline.config import load_run_config
    from pipeline.stages.registry import run_stage
    from tests.conftest import free_port, lopd, write_run

    cfg = write_run(tmp_path, trained_models, "train: {steps: 4, batch_size: 8, log_every: 1, shuffle_buffer: 16}")
    rc = load_run_config(cfg, ["rollouts.checker=arithmetic"])
    for stage in ("teacher_sft_data", "sft", "rollouts", "teacher_logprobs"):
        run_stage(stage, rc.stage(stage), show_progress=False)
    shards = tmp_path / "run" / "teacher_topk"
    assert all(r.reward is not None for r in _all(shards))
    sets = ["--set", "train.losses={lightning: 1.0, sft: 0.1, anchor_js: 0.05}", "--set", "train.methods.scope={}",
            "--set", "train.loss_schedule=[{until_step: 2, losses: {reverse_kl_topk: 1.0, lightning: 0.1}}]",
            "--set", "train.methods.paced={}", "--set", "train.methods.position.gamma=0.5",
            "--set", "train.methods.gopd={lam: 1.25, k3_guard: 0.01}"]
    res = lopd("train", "-c", str(cfg), "--set", f"train.out={tmp_path / 'a'}", *sets)
    assert f"promptstatisticsof{shards}:computed" in "".join(res.stderr.split())  # log lines wrap anywhere
    assert (shards / STATS_FILE).exists() and ShardSet.open(shards).problems() == []
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "loss/reverse_kl" in rows[0] and "loss/reverse_kl" not in rows[2]  # the schedule switched
    # G-OPD's top-k form (a frozen reference: train.student) only while a top-k loss runs
    assert rows[0]["gopd/kl_q_teacher"] > 0 and "gopd/kl_q_teacher" not in rows[2]
    for key in ("diag/drift_kl", "weights/mean", "weights/token_max", "lightning/k3_guard", "loss/lightning"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert "diag/student_topk_mass" in rows[0] and "diag/top1_agree" in rows[0]
    assert "rows/sft_frac" in rows[3] and 0.0 <= rows[3]["rows/sft_frac"] <= 1.0
    for name in ("paced", "position", "scope"):
        assert all(0.0 <= r[f"weights/{name}_kept"] <= 1.0 for r in rows)
    assert "loss/anchor_js" in rows[3] and "rows/anchor_js_frac" in rows[3]
    assert all(1.0 <= r["weights/position_mean"] <= r["weights/position_token_max"] <= 1.5 for r in rows)
    assert (tmp_path / "a" / "final" / "config.json").exists()
    res = lopd("train", "-c", str(cfg), "--set", f"train.out={tmp_path / 'b'}", "--set", "train.steps=1", *sets)
    assert f"promptstatisticsof{shards}:read" in "".join(res.stderr.split())
    # two ranks under torchrun (gloo) with FSDP2: the methods' step sums are all-reduced with the token counts, and
    # G-OPD's frozen reference is sharded like the student (rank 0 reads it)
    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "lopd.cli",
                          "train", "-c", str(cfg), "-q", "--set", f"train.out={tmp_path / 'ddp'}", "--set",
                          "train.steps=2", "--set", "train.fsdp=true", *sets],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss/total"]) for r in rows)
    assert all(math.isfinite(r["weights/paced_mean"]) for r in rows)
    assert all(r["gopd/kl_q_teacher"] > 0 for r in rows)


def _all(shards):
    from storage.codecs import decode_table

    s = ShardSet.open(shards)
    return [r for i in s.complete_indices() for r in decode_table(s.read_shard(i))]
