"""pipeline/stages/train.py: the offline OPD stage. The prompt statistics it reads for the methods (refusals
naming the shard set and the option, per set over several sources, KDRL's group advantages), the loss schedule and
the run key, its checks of the shard sets (teacher consistency, self-distillation, sources that cannot share a
step), G-OPD's reference model, and `lopd train` end to end with the methods on."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.fingerprint import TeacherMismatchError, model_fingerprint, read_provenance
from pipeline.stages.train import rollout_table, run_train, train_run_key
from pipeline.train import checkpoint
from pipeline.train.batching import collate
from pipeline.train.distributed import DistInfo
from pipeline.train.sources import MixedShardBatches
from storage.errors import LopdUserError
from storage.prompt_stats import STATS_FILE
from storage.shardset import ShardSet
from tests.conftest import REPO
from tests.train.helpers import (
    grouped_records,
    prefixed_records,
    source_shard_set,
    topk_shard_set,
    train_cfg,
    two_sources,
)

# --- prompt statistics for the methods -----------------------------------------------------------------------------


def test_methods_that_read_rewards_refuse_null_rewards_and_single_rollout_prompts(tmp_path):
    null = topk_shard_set(tmp_path / "null", grouped_records(reward=False))
    with pytest.raises(LopdUserError, match=rf"{tmp_path / 'null'}.*train.methods.paced needs each rollout's reward"):
        rollout_table(train_cfg(methods={"paced": {}}), null, "x")
    with pytest.raises(LopdUserError, match=r"train.rows.sft=correct needs each rollout's reward"):
        rollout_table(train_cfg(losses={"lightning": 1.0, "sft": 0.1}, rows={"sft": "correct"}), null, "x")
    single = topk_shard_set(tmp_path / "single", grouped_records(n_prompts=4, per_prompt=1))
    with pytest.raises(LopdUserError, match=rf"{tmp_path / 'single'}.*train.methods.paced compares the rollouts"):
        rollout_table(train_cfg(methods={"paced": {}}), single, "x")
    with pytest.raises(LopdUserError, match=r"train.rows.lightning=solved compares"):
        rollout_table(train_cfg(rows={"lightning": "solved"}), single, "x")
    correctness = train_cfg(losses={"lightning": 1.0, "sft": 0.1}, rows={"sft": "correct"})
    assert rollout_table(correctness, single, "x") is not None  # correctness needs no group
    with pytest.raises(LopdUserError, match=r"train.methods.scope compares"):
        rollout_table(train_cfg(methods={"scope": {}}), single, "x")
    with pytest.raises(LopdUserError, match=r"anchor_js \(on solved rows\) compares"):
        rollout_table(train_cfg(losses={"lightning": 1.0, "anchor_js": 0.1}), single, "x")


def test_lopd_train_refuses_them_in_one_line_before_any_work(tmp_path, tiny_models):
    """Through the CLI: exit code 2, one line naming the shard set, the option and the fix; no run directory."""
    from typer.testing import CliRunner

    from lopd.cli import app

    null = topk_shard_set(tmp_path / "null", grouped_records(reward=False))
    single = topk_shard_set(tmp_path / "single", grouped_records(n_prompts=4, per_prompt=1))
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


def test_prompt_statistics_across_sources_stay_per_set(tmp_path, tiny_models):
    """The methods that read prompt statistics run over several sets: each set's statistics are computed and
    stored beside it, and each record reads its own set's, even where two sets reuse prompt ids (set a: pass rate
    0.5, set b: the same prompt ids, all correct); a set without rewards is refused naming its directory."""
    from pipeline.stages.train import mixed_rollout_table
    from storage.prompt_stats import STATS_FILE

    a = source_shard_set(tmp_path / "a", prefixed_records("p", 24, seed=1))
    b = source_shard_set(tmp_path / "b",
                         [dataclasses.replace(r, reward=1.0) for r in prefixed_records("p", 16, seed=2)])
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
    null = source_shard_set(tmp_path / "null", [dataclasses.replace(r, reward=None) for r in prefixed_records("n", 8)])
    with pytest.raises(LopdUserError, match=rf"{null.root}.*train.methods.paced needs each rollout's reward"):
        run_train(TrainConfig(**{**cfg.model_dump(), "shards": [sources[0], {"path": null.root, "name": "n"}],
                                 "out": tmp_path / "out2"}), show_progress=False)
    assert not (tmp_path / "out2").exists()


def test_kdrl_reads_group_normalised_rewards_from_the_prompt_statistics(tmp_path):
    """Ahat_i = (r_i - mean_g r) / (std_g r + 1e-6), std_g the sample std (torch.std, as GRPO), per rollout from the
    prompt statistics; kdrl needs rewards and at least 2 rollouts per prompt."""
    from pipeline.stages.train import rollout_table

    records = prefixed_records("q", 12)
    shards = source_shard_set(tmp_path / "s", records)
    cfg = TrainConfig(student="s", shards="d", out="o", losses={"kdrl": 1.0})
    assert cfg.needs_prompt_stats()
    table = rollout_table(cfg, shards, "data-1")
    for r in records:
        group = [x.reward for x in records if x.prompt_id == r.prompt_id]
        want = (r.reward - sum(group) / len(group)) / (float(torch.tensor(group).std()) + 1e-6)
        got = table.advantage_R[table.rows([(r.prompt_id, r.sample_index)])[0]]
        assert got == pytest.approx(want, rel=1e-6)
    single = source_shard_set(tmp_path / "single", [dataclasses.replace(r, sample_index=0, prompt_id=f"p{i}")
                                              for i, r in enumerate(records)])
    with pytest.raises(LopdUserError, match="kdrl loss .* compares the rollouts"):
        rollout_table(cfg, single, "x")


# --- the loss schedule and the run key ----------------------------------------------------------------------------


def test_loss_schedule_phases_and_run_key():
    cfg = train_cfg(losses={"reverse_kl_topk": 1.0},
                    loss_schedule=[{"until_step": 3, "losses": {"forward_kl_topk": 1.0}},
                                   {"until_step": 5, "losses": {"jsd_topk": 1.0}}])
    assert [next(iter(cfg.losses_at(s))) for s in (1, 3, 4, 5, 6, 100)] == [
        "forward_kl_topk", "forward_kl_topk", "jsd_topk", "jsd_topk", "reverse_kl_topk", "reverse_kl_topk"]
    assert cfg.all_losses() == {"reverse_kl_topk", "forward_kl_topk", "jsd_topk"}
    with pytest.raises(ValueError, match="until_step must increase"):
        train_cfg(loss_schedule=[{"until_step": 5, "losses": {"sft": 1.0}}, {"until_step": 5, "losses": {"sft": 1.0}}])
    # the key of a run without methods is what it was before they existed; each method setting changes it
    plain = train_cfg()
    settings = {k: v for k, v in plain.model_dump(mode="json").items()
                if k not in {"out", "student", "shards", "steps", "checkpoint_every", "keep_checkpoints", "log_every",
                             "online", "loss_schedule", "rows", "methods", "akl_head_mass", "alpha_divergence",
                             "kdrl_beta", "kdrl_is_cap", "weight_norm", "eval", "report_to", "run_name"}
                | TrainConfig.EXECUTION_ONLY}
    assert train_run_key(plain, "m", "d") == checkpoint.run_fingerprint({"settings": settings, "student": "m",
                                                                         "data": "d"})
    keys = {train_run_key(c, "m", "d") for c in (
        plain, cfg, train_cfg(loss_schedule=[{"until_step": 3, "losses": {"forward_kl_topk": 1.0}}]),
        train_cfg(rows={"sft": "correct"}), train_cfg(methods={"paced": {}}),
        train_cfg(methods={"paced": {"alpha": 2.0}}),
        train_cfg(methods={"position": {}}), train_cfg(methods={"gopd": {}}), train_cfg(methods={"scope": {}}),
        train_cfg(akl_head_mass=0.3), train_cfg(alpha_divergence=0.5), train_cfg(kdrl_beta=1e-3),
        train_cfg(kdrl_is_cap=3.0),
        train_cfg(methods={"tip": {}}), train_cfg(methods={"opsd": {"clip": 1.0}}),
        train_cfg(methods={"paced": {}}, weight_norm="sum"))}
    assert len(keys) == 16


# --- the shard sets' teachers and sources ---------------------------------------------------------------------------


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


def test_a_mismatched_teacher_in_one_source_is_refused_naming_it(tmp_path, tiny_models):
    sources = two_sources(tmp_path, {"teacher_fingerprint": "model-b", "sft_teacher_fingerprint": "model-a",
                                      "teacher_mismatch_allowed": False})
    cfg = TrainConfig(student=tiny_models["student"], shards=sources, out=tmp_path / "out", batch_size=4, steps=1)
    with pytest.raises(TeacherMismatchError, match=rf"source 'code' \({tmp_path / 'b'}\)"):
        run_train(cfg, show_progress=False)
    assert not (tmp_path / "out").exists()
    # sources that cannot share a step are refused too: another k under a top-k loss
    source_shard_set(tmp_path / "k2", prefixed_records("c", 8), {"k": 2})
    other_k = [sources[0], {"path": str(tmp_path / "k2"), "name": "k2"}]
    cfg = TrainConfig(student=tiny_models["student"], shards=other_k, out=tmp_path / "out", batch_size=4, steps=1,
                      losses={"reverse_kl_topk": 1.0})
    with pytest.raises(LopdUserError, match="one k over the sources"):
        run_train(cfg, show_progress=False)
    source_shard_set(tmp_path / "vocab", prefixed_records("d", 8), {"vocab_size": 50})
    other_vocab = [sources[0], {"path": str(tmp_path / "vocab"), "name": "vocab"}]
    cfg = TrainConfig(student=tiny_models["student"], shards=other_vocab, out=tmp_path / "out", batch_size=4, steps=1)
    with pytest.raises(LopdUserError, match="vocabularies of different sizes"):
        run_train(cfg, show_progress=False)
    assert not (tmp_path / "out").exists()


# --- G-OPD's reference model ----------------------------------------------------------------------------------------


def test_gopd_topk_trains_with_its_reference_and_keys_it(tmp_path, tiny_models):
    """`run_train` with G-OPD's top-k form loads the frozen reference (default: train.student; or the one given),
    logs how far q moved from the teacher, and a run with another reference model has another run key."""
    from pipeline.stages.train import train_run_key
    from pipeline.train.objective import gopd_reference_needed

    shards = source_shard_set(tmp_path / "s", prefixed_records("q", 16))
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
                         cwd=REPO, capture_output=True,
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
