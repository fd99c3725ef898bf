"""Issue 11's second half: OPSD self-distillation as a teacher choice (and its per-token clip), several shard sets
mixed by weight in one run (one teacher per domain). Real tiny models and real shard files throughout."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.fingerprint import TeacherMismatchError, check_shard_teacher, model_fingerprint, read_provenance
from pipeline.stages.train import run_train
from pipeline.train import losses as L
from pipeline.train.batching import collate
from pipeline.train.distributed import DistInfo
from pipeline.train.objective import local_step_sums, micro_batch_loss, step_norms
from pipeline.train.sources import MixedShardBatches, mixed_draws
from pipeline.train.student import StudentLM
from storage.codecs import encode_records
from storage.errors import LopdUserError
from storage.shardset import ShardSet
from storage.synthetic import make_records

VOCAB, K = 19, 4  # the demo world's vocabulary (the tiny models')


def _records(prefix: str, n: int, seed: int = 0):
    """``n`` synthetic scored rollouts of prompts ``<prefix>0..``, ragged lengths."""
    out = []
    for i, r in enumerate(make_records(VOCAB, K, num_rollouts=n, response_len=7, prompt_len=3, seed=seed)):
        m = 2 + (5 * i) % 6
        out.append(dataclasses.replace(
            r, prompt_id=f"{prefix}{i // 2}", sample_index=i % 2, token_ids=r.token_ids[: r.prompt_len + m],
            teacher_logprobs=r.teacher_logprobs[:m], behavior_logprobs=r.behavior_logprobs[:m],
            topk_ids=r.topk_ids[:m], topk_logprobs=r.topk_logprobs[:m], tail_logprob=r.tail_logprob[:m],
            reward=float(i % 2)))
    return out


def _shard_set(root: Path, records, metadata: dict | None = None, per_shard: int = 4) -> ShardSet:
    s = ShardSet.create(root, "teacher_topk", {"k": K, **(metadata or {})})
    for i in range(0, len(records), per_shard):
        s.write_shard(i // per_shard, encode_records(records[i: i + per_shard], "plain", K, VOCAB), row_group_size=2)
    s.finalize(expected_shards=math.ceil(len(records) / per_shard))
    return s


# --- OPSD: self-distillation as a teacher choice --------------------------------------------------------------------


def test_the_trainers_teacher_check_reads_the_shard_metadata():
    """Consistent, self-distillation and a mismatch allowed at extraction pass (and say which); any other mismatch
    is refused naming where it is."""
    assert check_shard_teacher({"teacher_fingerprint": "m-a", "sft_teacher_fingerprint": "m-a"}, "x") == "consistent"
    assert check_shard_teacher({"teacher_fingerprint": "m-s", "sft_teacher_fingerprint": "m-a",
                                "self_distillation": True}, "x") == "self_distillation"
    assert check_shard_teacher({"teacher_fingerprint": "m-b", "sft_teacher_fingerprint": "m-a",
                                "teacher_mismatch_allowed": True}, "x") == "mismatch"
    with pytest.raises(TeacherMismatchError, match=r"in source 'math'.*teacher m-b.*teacher m-a"):
        check_shard_teacher({"teacher_fingerprint": "m-b", "sft_teacher_fingerprint": "m-a",
                             "teacher_mismatch_allowed": False}, "source 'math'")


@pytest.mark.integration
def test_self_distillation_shards_train_without_the_mismatch_flag(tmp_path, tiny_models):
    """The SFT student scoring its own rollouts with the prompts' privileged context is accepted as
    self-distillation (recorded in the shards and in the trained model's provenance), and trains without
    --allow-teacher-mismatch; without privileged context, or with another model, it is refused as before. Then
    `lopd train` with every method of this file on those shards, and a run mixing them 1:1 with the teacher's."""
    from pipeline.config import load_run_config
    from pipeline.demo.world import ModelShape, build_model, build_tokenizer, save_model_dir
    from pipeline.stages.registry import run_stage
    from tests.conftest import lopd, write_run

    cfg = write_run(tmp_path, tiny_models, "train: {steps: 2, batch_size: 4, log_every: 1, shuffle_buffer: 8}",
                    n_prompts=16)
    rc = load_run_config(cfg, ["rollouts.checker=arithmetic"])
    for stage in ("teacher_sft_data", "sft", "rollouts"):
        run_stage(stage, rc.stage(stage), show_progress=False)
    run = tmp_path / "run"
    student = run / "sft_student"
    opsd = [f"teacher_logprobs.teacher={student}", "teacher_logprobs.privileged_context=true",
            f"teacher_logprobs.prompts={tmp_path / 'prompts.jsonl'}", f"teacher_logprobs.out={run / 'self'}"]
    result = run_stage("teacher_logprobs", load_run_config(cfg, opsd).stage("teacher_logprobs"), show_progress=False)
    assert result.summary["teacher_relation"] == "self_distillation"
    meta = ShardSet.open(run / "self").metadata
    assert meta["self_distillation"] is True and meta["teacher_mismatch_allowed"] is False
    assert meta["teacher_fingerprint"] == meta["student_fingerprint"] == model_fingerprint(student)
    assert meta["teacher_fingerprint"] != meta["sft_teacher_fingerprint"]

    train = load_run_config(cfg, [f"train.shards={run / 'self'}", "train.methods.opsd.clip=2.0",
                                  "train.losses={reverse_kl_topk: 1.0}"]).stage("train")
    run_train(train, show_progress=False)
    provenance = read_provenance(run / "train" / "final")
    assert provenance["self_distillation"] is True and provenance["teacher_mismatch_allowed"] is False
    rows = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(0 <= r["topk/token_clip_frac"] <= 1 for r in rows)

    # the student without privileged context is not a teacher: refused, saying what self-distillation needs
    plain = [o for o in opsd if "privileged" not in o and "prompts" not in o]
    with pytest.raises(TeacherMismatchError, match="privileged_context=true"):
        run_stage("teacher_logprobs", load_run_config(cfg, plain).stage("teacher_logprobs"), show_progress=False)
    # another model with privileged context is a mismatch as before
    tok = build_tokenizer()
    other = tmp_path / "other"
    save_model_dir(build_model(tok, ModelShape(hidden_size=32, num_layers=1, num_heads=1, intermediate_size=64), 7),
                   tok, other)
    swapped = [f"teacher_logprobs.teacher={other}", *opsd[1:3], f"teacher_logprobs.out={run / 'other'}"]
    with pytest.raises(TeacherMismatchError, match="Teacher consistency violated"):
        run_stage("teacher_logprobs", load_run_config(cfg, swapped).stage("teacher_logprobs"), show_progress=False)
    assert not (run / "other").exists()

    # every new method at once through the CLI on these shards (rewards from the checker for kdrl)
    lopd("train", "-c", str(cfg), "-q", "--set", f"train.shards={run / 'self'}", "--set",
         f"train.out={run / 'all'}", "--set", "train.losses={lightning: 1.0, reverse_kl_topk: 0.5, kdrl: 0.5}",
         "--set", "train.lightning.importance=ppo_clip", "--set", "train.methods.bapo={}", "--set",
         "train.methods.tip={mode: soft_or, rho: 0.5}", "--set", "train.methods.cov={mode: kl_cov}",
         "--set", "train.methods.opsd.clip=2.0")
    rows = [json.loads(x) for x in (run / "all" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss/kdrl", "bapo/clip_low", "weights/tip_kept", "cov/selected_frac", "topk/token_clip_frac"):
        assert all(math.isfinite(r[key]) for r in rows), key
    # the teacher's shards and the self-distillation shards mixed 1:1 (two teachers in one run)
    run_stage("teacher_logprobs", rc.stage("teacher_logprobs"), show_progress=False)
    mixed = f"train.shards=[{{path: {run / 'teacher_topk'}, name: teacher}}, {{path: {run / 'self'}, name: self}}]"
    train = load_run_config(cfg, [mixed, f"train.out={run / 'mixed'}", "train.losses={reverse_kl_topk: 1.0}"])
    run_train(train.stage("train"), show_progress=False)
    last = [json.loads(x) for x in (run / "mixed" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["source/teacher/records"] == last["source/self/records"] == 4
    sources = read_provenance(run / "mixed" / "final")["sources"]
    assert sources["self"]["teacher_relation"] == "self_distillation"
    assert sources["teacher"]["teacher_relation"] == "consistent"


def _bucket_case(seed=0, N=8):
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
    s_topk, s_tail, t_topk, t_tail = _bucket_case()
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


def test_opsd_unreachable_clip_is_todays_trainer_loss_bit_for_bit(tiny_models):
    """Through the trainer's chunked head: methods.opsd with a cap no token reaches gives the loss and the
    gradients of the run without it, exactly."""
    from pipeline.models import load_model

    student_model = load_model(tiny_models["student"])
    student, params = StudentLM(student_model), list(student_model.parameters())
    batch = collate(_records("q", 8), pad_id=0)
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


# --- several shard sets mixed by weight -----------------------------------------------------------------------------


def test_mixed_draws_keep_every_source_within_one_record_of_its_share():
    weights = [5.0, 3.0, 2.0]
    counts = [0, 0, 0]
    for m in range(1, 2001):
        mixed_draws(weights, counts, 1)
        assert all(abs(c - m * w / 10.0) < 1.0 for c, w in zip(counts, weights, strict=True)), (m, counts)
    assert counts == [1000, 600, 400]
    # resuming from the counts continues the same sequence
    whole, first = [0, 0], [0, 0]
    seq = mixed_draws([1.0, 3.0], whole, 50)
    assert mixed_draws([1.0, 3.0], first, 20) + mixed_draws([1.0, 3.0], first, 30) == seq


def _two_sources(tmp_path: Path, second_meta: dict | None = None) -> list[dict]:
    _shard_set(tmp_path / "a", _records("a", 24, seed=1))
    _shard_set(tmp_path / "b", _records("b", 16, seed=2), second_meta)
    return [{"path": str(tmp_path / "a"), "weight": 3.0, "name": "math"},
            {"path": str(tmp_path / "b"), "weight": 1.0, "name": "code"}]


def test_mixed_stream_honours_the_weights_over_a_long_stream(tmp_path):
    """Over 60 steps of 8 records (several epochs of each set) the records come from the sources in the weights'
    proportions, within one record at every step; each source's records are its own set's."""
    cfg = TrainConfig(student="s", shards=_two_sources(tmp_path), out="o", batch_size=8, shuffle_buffer=4)
    source = MixedShardBatches(cfg, DistInfo(), micro=8, start=None)
    seen = {"a": 0, "b": 0}
    for step in range(1, 61):
        for r in source.next_records(8, 1):
            seen[r.prompt_id.removeprefix("math/").removeprefix("code/")[0]] += 1
        assert abs(seen["a"] - 6 * step) < 1 and abs(seen["b"] - 2 * step) < 1
    state = source.state_dict()
    assert state["records"] == {"math": 360, "code": 120}
    assert source.metrics(DistInfo())["source/math/frac"] == 0.75
    source.close()


def test_a_mismatched_teacher_in_one_source_is_refused_naming_it(tmp_path, tiny_models):
    sources = _two_sources(tmp_path, {"teacher_fingerprint": "model-b", "sft_teacher_fingerprint": "model-a",
                                      "teacher_mismatch_allowed": False})
    cfg = TrainConfig(student=tiny_models["student"], shards=sources, out=tmp_path / "out", batch_size=4, steps=1)
    with pytest.raises(TeacherMismatchError, match=rf"source 'code' \({tmp_path / 'b'}\)"):
        run_train(cfg, show_progress=False)
    assert not (tmp_path / "out").exists()
    # sources that cannot share a step are refused too: another k under a top-k loss
    _shard_set(tmp_path / "k2", _records("c", 8), {"k": 2})
    other_k = [sources[0], {"path": str(tmp_path / "k2"), "name": "k2"}]
    cfg = TrainConfig(student=tiny_models["student"], shards=other_k, out=tmp_path / "out", batch_size=4, steps=1,
                      losses={"reverse_kl_topk": 1.0})
    with pytest.raises(LopdUserError, match="one k over the sources"):
        run_train(cfg, show_progress=False)
    _shard_set(tmp_path / "vocab", _records("d", 8), {"vocab_size": 50})
    other_vocab = [sources[0], {"path": str(tmp_path / "vocab"), "name": "vocab"}]
    cfg = TrainConfig(student=tiny_models["student"], shards=other_vocab, out=tmp_path / "out", batch_size=4, steps=1)
    with pytest.raises(LopdUserError, match="vocabularies of different sizes"):
        run_train(cfg, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_prompt_statistics_across_sources_stay_per_set(tmp_path, tiny_models):
    """The methods that read prompt statistics run over several sets: each set's statistics are computed and
    stored beside it, and each record reads its own set's, even where two sets reuse prompt ids (set a: pass rate
    0.5, set b: the same prompt ids, all correct); a set without rewards is refused naming its directory."""
    from pipeline.stages.train import mixed_rollout_table
    from storage.prompt_stats import STATS_FILE

    a = _shard_set(tmp_path / "a", _records("p", 24, seed=1))
    b = _shard_set(tmp_path / "b", [dataclasses.replace(r, reward=1.0) for r in _records("p", 16, seed=2)])
    sources = [{"path": str(a.root), "weight": 3.0, "name": "math"}, {"path": str(b.root), "name": "code"}]
    cfg = TrainConfig(student=tiny_models["student"], shards=sources, out=tmp_path / "out", batch_size=8, steps=3,
                      losses={"lightning": 1.0, "sft": 0.2}, rows={"sft": "solved"}, methods={"paced": {}},
                      log_every=1, shuffle_buffer=4)
    table = mixed_rollout_table(cfg, {"math": a, "code": b})
    assert (a.root / STATS_FILE).exists() and (b.root / STATS_FILE).exists()
    source = MixedShardBatches(cfg, DistInfo(), micro=8, start=None)
    batch_records = source.next_records(8, 1) + source.next_records(8, 1)
    source.close()
    batch = collate(batch_records, pad_id=0, rollouts=table)
    expected = [1.0 if r.prompt_id.startswith("code/") else 0.5 for r in batch_records]
    assert batch.pass_rate_B.tolist() == expected and 0.5 in expected and 1.0 in expected
    assert mixed_rollout_table(cfg.model_copy(update={"methods": cfg.methods.model_copy(update={"paced": None}),
                                                      "rows": {}}), {"math": a, "code": b}) is None
    result = run_train(cfg, show_progress=False)
    rows = [json.loads(x) for x in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss/total"]) for r in rows)
    assert all(0 < r["rows/sft_frac"] < 1 for r in rows)  # the solved route reaches set b's rows only
    null = _shard_set(tmp_path / "null", [dataclasses.replace(r, reward=None) for r in _records("n", 8)])
    with pytest.raises(LopdUserError, match=rf"{null.root}.*train.methods.paced needs each rollout's reward"):
        run_train(TrainConfig(**{**cfg.model_dump(), "shards": [sources[0], {"path": null.root, "name": "n"}],
                                 "out": tmp_path / "out2"}), show_progress=False)
    assert not (tmp_path / "out2").exists()


def test_two_sources_train_stop_and_resume_exactly(tmp_path, tiny_models):
    """A run over two sources killed after step 3 and resumed (with the prefetching reader, then without) has the
    loss curve, per-source counts and final weights of an uninterrupted run; a single path keeps its run key."""
    from pipeline.models import load_model

    sources = _two_sources(tmp_path)
    common = dict(student=tiny_models["student"], shards=sources, steps=6, batch_size=4, log_every=1,
                  checkpoint_every=1, shuffle_buffer=4, losses={"reverse_kl_topk": 1.0, "lightning": 0.5})
    run_train(TrainConfig(out=tmp_path / "ref", **common), show_progress=False)
    for depth, stop in ((2, 3), (0, None)):
        run_train(TrainConfig(out=tmp_path / "cut", prefetch_batches=depth, **common), show_progress=False,
                  stop_after=stop)

    def rows(out):
        return [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    ref, cut = rows("ref"), rows("cut")
    keys = ["loss/total", "source/math/records", "source/code/records", "source/math/tokens", "source/code/tokens"]
    assert len(ref) == 6 and [[r[k] for k in keys] for r in cut] == [[r[k] for k in keys] for r in ref]
    assert ref[-1]["source/math/records"] == 18 and ref[-1]["source/code/records"] == 6
    a, b = load_model(tmp_path / "ref" / "final").state_dict(), load_model(tmp_path / "cut" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    provenance = read_provenance(tmp_path / "ref" / "final")
    assert provenance["sources"]["math"]["weight"] == 3.0
    assert provenance["sources"]["code"]["teacher_relation"] == "consistent"


def test_prefect_cache_key_reads_every_listed_source(tmp_path):
    """The stage tasks' cache key fingerprints each listed shard set (a changed source is a new key)."""
    from flows.caching import stage_inputs

    cfg = TrainConfig(student="s", shards=_two_sources(tmp_path), out="o")
    inputs = stage_inputs(cfg)
    assert inputs["shards.0.path"] == tmp_path / "a" and inputs["shards.1.path"] == tmp_path / "b"


# --- TIP token selection --------------------------------------------------------------------------------------------


def _trainer_loss(student, cfg, batch, params):
    mask = batch.mask_B_T.bool()
    tok, seq = mask.sum().to(torch.float64), mask.any(-1).sum().to(torch.float64)
    norms = step_norms(cfg, tok, seq, torch.tensor(local_step_sums(cfg, [batch]), dtype=torch.float64))
    loss, metrics = micro_batch_loss(student, cfg, batch, tok, seq, norms)
    return loss, torch.autograd.grad(loss, params), metrics


@pytest.mark.parametrize("mode", ["soft_or", "entropy"])
@pytest.mark.parametrize("losses", [{"lightning": 1.0}, {"reverse_kl_topk": 1.0}, {"reverse_kl_topk": 1.0,
                                                                                     "lightning": 0.1, "sft": 0.5}])
def test_tip_with_rho_one_is_todays_loss_bit_for_bit(mode, losses, tiny_models):
    """rho = 1 runs the pre-pass and keeps every token with weight 1: the loss and gradients of the run without
    TIP, exactly (chunked head, 7-token chunks)."""
    from pipeline.models import load_model

    lm = load_model(tiny_models["student"])
    student, params = StudentLM(lm), list(lm.parameters())
    batch = collate(_records("q", 8), pad_id=0)
    ref = _trainer_loss(student, TrainConfig(student="s", shards="d", out="o", losses=losses, logits_chunk_tokens=7),
                        batch, params)
    got = _trainer_loss(student, TrainConfig(student="s", shards="d", out="o", losses=losses, logits_chunk_tokens=7,
                                             methods={"tip": {"mode": mode, "rho": 1.0, "gamma": 1.0}}), batch, params)
    assert abs(ref[0].item()) > 1e-3 and torch.equal(got[0], ref[0])
    assert all(torch.equal(a, b) for a, b in zip(got[1], ref[1], strict=True))
    assert got[2]["weights/tip_kept"].item() == 1.0


def test_tip_soft_or_ranks_confident_and_wrong_first():
    from pipeline.train.weighting import tip_keep, tip_soft_or_scores

    entropy = torch.tensor([0.1, 0.1, 2.0, 2.0, 1.0], dtype=torch.float64)
    divergence = torch.tensor([3.0, 0.01, 3.0, 0.01, 1.0], dtype=torch.float64)
    score = tip_soft_or_scores(entropy, divergence)
    assert score.argmax().item() == 0  # confident and wrong
    assert score[0] > score[1] and score[0] > score[2] and score[4] > score[3]
    assert tip_keep(score, 0.4, sample=False).tolist() == [True, False, False, False, True]
    assert tip_soft_or_scores(torch.ones(4, dtype=torch.float64), divergence[:4]).tolist() == divergence[:4].tolist()


def test_tip_soft_or_selection_against_a_full_logits_reference(tiny_models):
    """float64: the trainer's chunked pre-pass + loss equals the loss computed from full logits with the same
    selection (entropy and bucket reverse KL per token, top ceil(rho N) by (1 - h) D, kept tokens weighted N / kept):
    loss and gradients."""
    from pipeline.models import load_model
    from pipeline.train.weighting import tip_kept_count, tip_soft_or_scores

    lm = load_model(tiny_models["student"]).double()
    student, params = StudentLM(lm), list(lm.parameters())
    batch = collate(_records("q", 8), pad_id=0)
    cfg = TrainConfig(student="s", shards="d", out="o", losses={"reverse_kl_topk": 1.0}, logits_chunk_tokens=5,
                      methods={"tip": {"mode": "soft_or", "rho": 0.3}})
    loss, grads, metrics = _trainer_loss(student, cfg, batch, params)

    mask = batch.mask_B_T.bool()
    logits = lm(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_B_L).logits[:, :-1][mask]
    from pipeline.train.head import token_stats

    stats = token_stats(logits, batch.input_ids_B_L[:, 1:][mask], batch.topk_ids_B_T_K[mask], entropy=True)
    student_b = torch.cat([stats.topk_logprobs, stats.tail_logprob[:, None]], -1)
    teacher_b = torch.cat([batch.topk_logprobs_B_T_K[mask], batch.tail_logprob_B_T[mask][:, None]], -1).double()
    kl = (student_b.exp() * (student_b - teacher_b.clamp_min(L.REVERSE_KL_TEACHER_FLOOR))).sum(-1)
    n = kl.numel()
    keep = tip_kept_count(n, 0.3)
    kept = torch.topk(tip_soft_or_scores(stats.entropy.detach(), kl.detach()), keep).indices
    ref = kl[kept].sum() * (n / keep) / n
    ref_grads = torch.autograd.grad(ref, params)
    # the token weights are float32 (as the other methods'), so N / kept carries float32 rounding
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert metrics["weights/tip_kept"].item() == pytest.approx(keep / n)


def test_tip_entropy_mode_samples_by_entropy_reproducibly(tiny_models):
    """Entropy mode keeps ceil(rho N) tokens drawn without replacement with probability ~ (H / ln V)^alpha, from
    torch's generator: the same seed gives the same selection (and loss), another seed another."""
    from pipeline.models import load_model
    from pipeline.train.weighting import tip_entropy_probs

    lm = load_model(tiny_models["student"]).double()
    student, params = StudentLM(lm), list(lm.parameters())
    batch = collate(_records("q", 8), pad_id=0)
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


# --- KDRL ------------------------------------------------------------------------------------------------------------


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


def test_kdrl_reads_group_normalised_rewards_from_the_prompt_statistics(tmp_path):
    """Ahat_i = (r_i - mean_g r) / (std_g r + 1e-6) per rollout from the prompt statistics; kdrl needs rewards and
    at least 2 rollouts per prompt."""
    from pipeline.stages.train import rollout_table

    records = _records("q", 12)
    shards = _shard_set(tmp_path / "s", records)
    cfg = TrainConfig(student="s", shards="d", out="o", losses={"kdrl": 1.0})
    assert cfg.needs_prompt_stats()
    table = rollout_table(cfg, shards, "data-1")
    for r in records:
        group = [x.reward for x in records if x.prompt_id == r.prompt_id]
        want = (r.reward - sum(group) / len(group)) / (float(torch.tensor(group).std(unbiased=False)) + 1e-6)
        got = table.advantage_R[table.rows([(r.prompt_id, r.sample_index)])[0]]
        assert got == pytest.approx(want, rel=1e-6)
    single = _shard_set(tmp_path / "single", [dataclasses.replace(r, sample_index=0, prompt_id=f"p{i}")
                                              for i, r in enumerate(records)])
    with pytest.raises(LopdUserError, match="kdrl loss .* compares the rollouts"):
        rollout_table(cfg, single, "x")


def test_kdrl_through_train_step_is_invariant_to_accumulation(tmp_path, tiny_models):
    """``train_step`` with kdrl (and lightning): one micro-batch of 8 and 8 of 1 give the same losses and the same
    SGD update (float64)."""
    from pipeline.models import load_model
    from pipeline.stages.train import rollout_table
    from pipeline.train.loop import train_step
    from pipeline.train.metrics import StepMeter

    records = _records("q", 8)
    shards = _shard_set(tmp_path / "s", records)

    class Source:
        def next_records(self, n, parts):
            return records[:n]

        def state_dict(self):
            return {}

    results = []
    for accum in (1, 8):
        cfg = TrainConfig(student="s", shards="d", out="o", losses={"kdrl": 1.0, "lightning": 0.5}, kdrl_beta=0.1,
                          batch_size=8, grad_accum=accum, optim={"grad_clip": None})
        student = StudentLM(load_model(tiny_models["student"]).double())
        before = [p.detach().clone() for p in student.parameters()]
        opt = torch.optim.SGD(student.parameters(), lr=1.0)
        metrics, _ = train_step(student, opt, cfg, Source(), 8, 0, DistInfo(), torch.device("cpu"), StepMeter(1, 1),
                                rollout_table(cfg, shards, "k"))
        results.append((metrics, [b - p.detach() for b, p in zip(before, student.parameters(), strict=True)]))
    (one, one_update), (many, many_update) = results
    assert abs(one["loss/kdrl"].item()) > 1e-4 and one["kdrl/distill"].item() > 0
    for key in ("loss/total", "loss/kdrl", "loss/lightning"):
        assert many[key].item() == pytest.approx(one[key].item(), rel=1e-10), key
    for a, b in zip(one_update, many_update, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# --- BAPO ------------------------------------------------------------------------------------------------------------


def test_bapo_bounds_widen_until_the_contributions_balance():
    d = torch.float64
    # negative tokens outweigh: c_lo rises from 0.6 past 0.62, dropping that token's negative contribution
    ratio, adv = torch.tensor([1.0, 0.62, 0.9], dtype=d), torch.tensor([1.0, -1.0, -1.0], dtype=d)
    low, high = L.bapo_bounds(ratio, adv)
    assert low == pytest.approx(0.65) and high == 1.2
    # c_lo reaches its max, then c_hi rises until the positive token at r = 1.45 counts
    ratio, adv = torch.tensor([1.45, 0.9, 1.0], dtype=d), torch.tensor([1.0, -1.0, 0.1], dtype=d)
    low, high = L.bapo_bounds(ratio, adv)
    assert low == pytest.approx(0.8) and 1.45 <= high < 1.5 + 1e-9
    # all advantages >= 0, or step 0: the bounds stay
    assert L.bapo_bounds(ratio, adv.abs()) == (0.6, 1.2)
    assert L.bapo_bounds(torch.tensor([1.0, 0.62], dtype=d), torch.tensor([0.1, -1.0], dtype=d), step=0.0) == (0.6, 1.2)
    # nothing can balance: both bounds end at their max
    assert L.bapo_bounds(torch.tensor([3.0, 1.0], dtype=d), torch.tensor([1.0, -1.0], dtype=d)) == pytest.approx(
        (0.8, 2.0))


def test_bapo_at_the_rollout_policy_has_the_gradient_of_importance_none():
    student, teacher, behavior, mask = _kdrl_case(seed=3)
    at_mu = behavior.clone().requires_grad_()
    bapo, _ = L.lightning_pg(at_mu, teacher, behavior, mask, importance="ppo_clip", ratio_bounds=(0.7, 1.5),
                             normalization="token")
    plain, _ = L.lightning_pg(at_mu, teacher, behavior, mask, importance="none", normalization="token")
    torch.testing.assert_close(torch.autograd.grad(bapo, at_mu)[0], torch.autograd.grad(plain, at_mu)[0],
                               rtol=1e-12, atol=1e-15)


def test_bapo_neutral_is_ppo_clip_bit_for_bit_and_adapts_through_the_trainer(tiny_models):
    """Fixed bounds equal to PPO's (step 0) give the plain PPO-clip loss and gradients exactly; the default
    adapts per micro-batch and logs its bounds."""
    from pipeline.models import load_model

    lm = load_model(tiny_models["student"])
    student, params = StudentLM(lm), list(lm.parameters())
    batch = collate(_records("q", 8), pad_id=0)
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


def test_clip_cov_and_kl_cov_through_the_trainer(tiny_models):
    """Neutral settings (kl_coef 0; an empty covariance range) are today's loss bit for bit; Clip-Cov over every
    token leaves lightning no gradient; KL-Cov over every token adds kl_coef |log p_theta - log mu| to each token
    (float64, against the formula on full logits)."""
    from pipeline.models import load_model

    lm = load_model(tiny_models["student"])
    student, params = StudentLM(lm), list(lm.parameters())
    batch = collate(_records("q", 8), pad_id=0)
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


@pytest.mark.integration
def test_two_sources_under_torchrun_with_two_ranks(tmp_path, tiny_models):
    """Two processes (gloo): each rank mixes its own slice of each source; the per-source counts are summed over
    the ranks at every log step (all ranks take part, no hang)."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.conftest import free_port

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "train": {
        "student": str(tiny_models["student"]), "shards": _two_sources(tmp_path), "steps": 3, "batch_size": 8,
        "log_every": 1, "shuffle_buffer": 4, "losses": {"reverse_kl_topk": 1.0}}}))
    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "lopd.cli",
                          "train", "-c", str(cfg), "-q"], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [(r["source/math/records"], r["source/code/records"]) for r in rows] == [(6, 2), (12, 4), (18, 6)]


# --- G-OPD / ExOPD, top-k form ----------------------------------------------------------------------------------------


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
    batch = collate(_records("q", 8), pad_id=0)
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


def test_gopd_topk_trains_with_its_reference_and_keys_it(tmp_path, tiny_models):
    """`run_train` with G-OPD's top-k form loads the frozen reference (default: train.student; or the one given),
    logs how far q moved from the teacher, and a run with another reference model has another run key."""
    from pipeline.stages.train import train_run_key
    from pipeline.train.objective import gopd_reference_needed

    shards = _shard_set(tmp_path / "s", _records("q", 16))
    common = dict(student=tiny_models["student"], shards=shards.root, steps=2, batch_size=4, log_every=1,
                  losses={"reverse_kl_topk": 1.0, "lightning": 0.2})
    for name, gopd in (("default", {"lam": 1.25}), ("teacher", {"lam": 1.25, "reference": tiny_models["teacher"]})):
        result = run_train(TrainConfig(out=tmp_path / name, methods={"gopd": gopd}, **common), show_progress=False)
        rows = [json.loads(x) for x in (result.out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(r["gopd/kl_q_teacher"] > 0 and math.isfinite(r["loss/total"]) for r in rows)
    cfgs = [TrainConfig(out="o", methods={"gopd": g}, **common)
            for g in ({"lam": 1.25}, {"lam": 1.25, "reference": tiny_models["teacher"]}, {"lam": 1.0})]
    assert len({train_run_key(c, "m", "d") for c in cfgs}) == 3
    assert [gopd_reference_needed(c) for c in cfgs] == [True, True, False]
    assert not gopd_reference_needed(TrainConfig(out="o", methods={"gopd": {"lam": 1.25}},
                                                 **{**common, "losses": {"lightning": 1.0}}))
    with pytest.raises(LopdUserError, match="train.methods.gopd.reference"):
        run_train(TrainConfig(out=tmp_path / "missing", methods={"gopd": {"lam": 1.25, "reference": tmp_path / "no"}},
                              **common), show_progress=False)
