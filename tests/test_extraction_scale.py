"""Teacher extraction at scale, on real tiny models: the vocabulary is the model's output size, scoring in
token-bounded sub-batches gives the shards of one-batch scoring, ``k: 0`` (Lightning-only) shards, and a
failing stage leaves no engine processes behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
    from pipeline.demo_world import save_model_dir
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
