"""Teacher extraction at scale, on real tiny models: the vocabulary is the model's output size, scoring in
token-bounded sub-batches gives the shards of one-batch scoring, ``k: 0`` (Lightning-only) shards, and a
failing stage leaves no engine processes behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import RolloutsConfig, SamplingConfig, TeacherLogprobsConfig
from pipeline.prompts import PromptRecord, write_prompts_jsonl
from pipeline.stages.sampling import run_rollouts
from pipeline.stages.teacher_logprobs import run_teacher_logprobs
from pipeline.tasks.arithmetic import make_problems
from storage.codecs import decode_table
from storage.inspect import verify_shards
from storage.shardset import ShardSet


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory, tiny_models) -> Path:
    """16 prompts x 2 samples from the tiny student, 2 shards (transformers engine)."""
    tmp = tmp_path_factory.mktemp("extraction")
    prompts = tmp / "prompts.jsonl"
    write_prompts_jsonl([PromptRecord(p.id, p.prompt, p.answer) for p in make_problems(16, 2, seed=0)], prompts)
    run_rollouts(RolloutsConfig(prompts=prompts, student=tiny_models["student"], out=tmp / "rollouts",
                                sampling=SamplingConfig(n=2, max_new_tokens=12, seed=0), prompts_per_shard=8),
                 show_progress=False)
    return tmp / "rollouts"


def score(rollouts: Path, teacher: Path, out: Path, **overrides) -> list:
    """Run the teacher-logprobs stage; all records of its shards, in shard order."""
    cfg = TeacherLogprobsConfig(rollouts=rollouts, teacher=teacher, out=out, allow_teacher_mismatch=True, **overrides)
    run_teacher_logprobs(cfg, show_progress=False)
    shards = ShardSet.open(out)
    assert verify_shards(out) == []
    return [r for i in shards.complete_indices() for r in decode_table(shards.read_shard(i))]


@pytest.fixture(scope="module")
def padded_teacher(tmp_path_factory, tiny_models) -> Path:
    """The tiny teacher with 8 output rows beyond the tokenizer's tokens (as checkpoints pad their lm head)."""
    from pipeline.demo.world import save_model_dir
    from pipeline.models import load_model, load_tokenizer

    tok = load_tokenizer(tiny_models["teacher"])
    model = load_model(tiny_models["teacher"])
    model.resize_token_embeddings(len(tok) + 8)
    return save_model_dir(model, tok, tmp_path_factory.mktemp("padded") / "teacher")


def test_vocabulary_is_the_model_output_size(rollouts, padded_teacher, tmp_path):
    from pipeline.engines.base import model_vocab_size
    from pipeline.models import load_tokenizer

    n_tok = len(load_tokenizer(padded_teacher))
    vocab = n_tok + 8
    assert model_vocab_size(padded_teacher, n_tok) == vocab
    with pytest.raises(ValueError, match="tokenizer has"):
        model_vocab_size(padded_teacher, vocab + 1)
    # k = the whole output layer: every position's top-k holds the padded rows
    records = score(rollouts, padded_teacher, tmp_path / "shards", k=vocab, codec="compact")
    assert ShardSet.open(tmp_path / "shards").metadata["vocab_size"] == vocab
    ids = np.concatenate([r.topk_ids for r in records])
    assert ids.shape[1] == vocab and (ids >= n_tok).sum(1).min() == 8


def test_k0_shards_hold_only_the_sampled_token_logprobs(rollouts, tiny_models, tmp_path):
    """k = 0 (Lightning-only): no top-k columns are written; verified and read back (through the streaming
    reader too) with top-k arrays of shape [R, 0]; the same sampled-token log-probs as a top-k extraction."""
    from storage.codecs import TOPK_COLUMNS
    from storage.reader import iter_batches

    with_topk = score(rollouts, tiny_models["teacher"], tmp_path / "k4", k=4)
    sizes = {}
    for codec in ("compact", "plain"):
        out = tmp_path / f"k0-{codec}"
        records = score(rollouts, tiny_models["teacher"], out, k=0, codec=codec)
        shards = ShardSet.open(out)
        assert shards.metadata["k"] == 0
        assert not set(TOPK_COLUMNS[codec]) & set(shards.read_shard(0).column_names)
        assert len(records) == len(with_topk)
        for a, b in zip(records, with_topk):
            assert np.array_equal(a.token_ids, b.token_ids)
            assert np.array_equal(a.teacher_logprobs, b.teacher_logprobs)
            assert np.array_equal(a.behavior_logprobs, b.behavior_logprobs)
            assert a.topk_ids.shape == a.topk_logprobs.shape == (a.num_response_tokens, 0)
            assert a.topk_ids.dtype == np.int32 and not a.tail_logprob.any()
        streamed = [r for batch, _ in iter_batches(out, 5, num_epochs=1) for r in batch]
        assert len(streamed) == len(records) and all(r.topk_ids.shape[1] == 0 for r in streamed)
        sizes[codec] = shards.manifest["totals"]["bytes"]
    assert max(sizes.values()) < ShardSet.open(tmp_path / "k4").manifest["totals"]["bytes"]


def test_sub_batched_extraction_equals_one_batch(rollouts, tiny_models, tmp_path):
    """score_tokens_per_call = 40 splits every shard into many engine calls and encoded sub-batches; the
    shards hold the same rows (ids exact; log-probs up to float32 rounding of other batch shapes)."""
    one = score(rollouts, tiny_models["teacher"], tmp_path / "one", k=4)
    sub = score(rollouts, tiny_models["teacher"], tmp_path / "sub", k=4,
                engine={"score_tokens_per_call": 40})
    assert [(r.prompt_id, r.sample_index) for r in one] == [(r.prompt_id, r.sample_index) for r in sub]
    for a, b in zip(one, sub):
        assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.teacher_logprobs, b.teacher_logprobs, atol=2e-6, rtol=0)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=2e-6, rtol=0)
    # each sub-batch was streamed into its shard: the bytes of one write of the whole shard's table (as the
    # codec typed it: Parquet reads list children back as "element", the codec names them "item")
    streamed = ShardSet.open(tmp_path / "sub")
    whole = ShardSet.create(tmp_path / "whole", streamed.kind, streamed.metadata)
    for i in streamed.complete_indices():
        table = streamed.read_shard(i)
        table = table.cast(pa.schema([pa.field(f.name, pa.list_(f.type.value_type)) if pa.types.is_list(f.type)
                                      else f for f in table.schema], metadata=table.schema.metadata))
        whole.write_shard(i, table)
        assert whole.shard_path(i).read_bytes() == streamed.shard_path(i).read_bytes()


def _live_children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != "zombie"
            and "resource_tracker" not in " ".join(p.cmdline())}


@pytest.mark.vllm
def test_failing_vllm_stage_leaves_no_worker_processes(rollouts, tiny_models, tmp_path, monkeypatch):
    """The stage fails while scoring its second shard: the engine (vLLM's engine core process) is shut down
    anyway, and the first shard, scored in sub-batches at k = 0, is complete and matches transformers."""
    pytest.importorskip("vllm")
    import pipeline.stages.teacher_logprobs as stage

    real, calls = stage.score_table_rows, []
    first_shard = set(ShardSet.open(rollouts).read_shard(0)["prompt_id"].to_pylist())

    def failing(engine, rows, *args):
        calls.append(len(rows))
        if rows[0]["prompt_id"] not in first_shard:
            raise RuntimeError("scoring failed")
        return real(engine, rows, *args)

    monkeypatch.setattr(stage, "score_table_rows", failing)
    before = _live_children()
    with pytest.raises(RuntimeError, match="scoring failed"):
        score(rollouts, tiny_models["teacher"], tmp_path / "vllm", k=0,
              engine={"name": "vllm", "score_tokens_per_call": 100})
    assert _live_children() - before == set()
    assert len(calls) >= 3  # shard 0 went to the engine in sub-batches
    monkeypatch.undo()
    got = ShardSet.open(tmp_path / "vllm")
    assert got.complete_indices() == [0]
    ref = score(rollouts, tiny_models["teacher"], tmp_path / "hf", k=0)
    vllm_records = decode_table(got.read_shard(0))
    assert len(vllm_records) == 16
    for a, b in zip(vllm_records, ref):
        assert np.array_equal(a.token_ids, b.token_ids) and a.topk_ids.shape == (a.num_response_tokens, 0)
        np.testing.assert_allclose(a.teacher_logprobs, b.teacher_logprobs, atol=1e-4, rtol=0)


@pytest.mark.vllm
def test_scoring_memory_is_bounded_by_the_token_budget():
    """The stage's scoring loop over one shard, with vLLM's output structures from a stand-in generate: a
    worker's memory growth follows the per-call budget (score_tokens_per_call, or score_logprobs_per_call at a
    large k), not the shard (32 x 1,024 tokens at k = 128 hold ~4M log-prob entries as Python objects when scored
    in one call)."""
    pytest.importorskip("vllm")
    from pipeline.bench.stages import extraction_memory_peak

    one_call = extraction_memory_peak(128, rows=32, length=1024, budget=10**6, logprobs_budget=10**12)
    bounded = extraction_memory_peak(128, rows=32, length=1024, budget=2048, logprobs_budget=10**12)
    # the default entry budget bounds it too, at k = 128 without lowering the token budget
    by_entries = extraction_memory_peak(128, rows=32, length=1024, budget=10**6, logprobs_budget=2048 * 129)
    assert by_entries["tokens_per_call"] == 2048 and one_call["tokens_per_call"] == 10**6
    assert one_call["response_tokens"] == bounded["response_tokens"] == 32 * (1024 - 256)
    grow_one = one_call["peak_rss_mb"] - one_call["rss_before_scoring_mb"]
    grow_bounded = bounded["peak_rss_mb"] - bounded["rss_before_scoring_mb"]
    assert grow_bounded < grow_one / 3, (one_call, bounded)
    grow_by_entries = by_entries["peak_rss_mb"] - by_entries["rss_before_scoring_mb"]
    assert grow_by_entries < grow_one / 3, (one_call, by_entries)


def test_tokens_per_scoring_call_fall_with_k_past_the_entry_budget():
    """score_tokens_per_call(engine, k): the token budget up to k = 63 (2^21 entries / 64 = 32,768), then
    2^21 / (k + 1) tokens, so a call's log-prob entries (and a worker's host memory) stay bounded at any k."""
    from pipeline.config import EngineConfig, score_tokens_per_call

    engine = EngineConfig()
    assert [score_tokens_per_call(engine, k) for k in (0, 20, 50, 63, 64, 128)] == [
        32_768, 32_768, 32_768, 32_768, 2**21 // 65, 2**21 // 129]
    assert score_tokens_per_call(EngineConfig(score_logprobs_per_call=10), 128) == 1  # at least one token
    assert score_tokens_per_call(EngineConfig(score_tokens_per_call=100), 128) == 100
