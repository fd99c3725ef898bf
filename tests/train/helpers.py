"""Builders shared by the trainer's tests: synthetic scored rollouts on the demo world's vocabulary, finished
teacher top-k shard sets of them, train configs. Two record builders and two shard-set writers, as their tests were
written: grouped_records / topk_shard_set (prompts with pass rates 0.25, 0.5, 1, 0 in turn; 5 records a shard) and
prefixed_records / source_shard_set (prompts named by a prefix, 2 rollouts each; 4 records a shard, metadata
allowed)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from pipeline.config import TrainConfig
from storage.codecs import encode_records
from storage.shardset import ShardSet
from storage.synthetic import make_records

VOCAB, K = 19, 4  # the demo world's vocabulary (the tiny models')


def grouped_records(n_prompts: int = 3, per_prompt: int = 4, seed: int = 0, reward: bool = True):
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


def topk_shard_set(root, records, per_shard: int = 5) -> ShardSet:
    """A finished teacher top-k set of these records, ``per_shard`` per shard in row groups of 2."""
    s = ShardSet.create(root, "teacher_topk", {"k": K})
    for i in range(0, len(records), per_shard):
        s.write_shard(i // per_shard, encode_records(records[i: i + per_shard], "plain", K, VOCAB), row_group_size=2)
    s.finalize(expected_shards=math.ceil(len(records) / per_shard))
    return s


def train_cfg(**kw) -> TrainConfig:
    return TrainConfig(student="s", shards="d", out="o", **kw)


def prefixed_records(prefix: str, n: int, seed: int = 0):
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


def source_shard_set(root: Path, records, metadata: dict | None = None, per_shard: int = 4) -> ShardSet:
    s = ShardSet.create(root, "teacher_topk", {"k": K, **(metadata or {})})
    for i in range(0, len(records), per_shard):
        s.write_shard(i // per_shard, encode_records(records[i: i + per_shard], "plain", K, VOCAB), row_group_size=2)
    s.finalize(expected_shards=math.ceil(len(records) / per_shard))
    return s


def two_sources(tmp_path: Path, second_meta: dict | None = None) -> list[dict]:
    source_shard_set(tmp_path / "a", prefixed_records("a", 24, seed=1))
    source_shard_set(tmp_path / "b", prefixed_records("b", 16, seed=2), second_meta)
    return [{"path": str(tmp_path / "a"), "weight": 3.0, "name": "math"},
            {"path": str(tmp_path / "b"), "weight": 1.0, "name": "code"}]


NAMED_LOSS_SETS = {
    "lightning_sequence": {"lightning": 1.0},
    "lightning_token_ppo": {"lightning": 1.0},
    "reverse_kl_topk": {"reverse_kl_topk": 1.0},
    "forward_kl_topk": {"forward_kl_topk": 1.0},
    "jsd_topk": {"jsd_topk": 1.0},
    "tvd_topk": {"tvd_topk": 1.0},
    "sft": {"sft": 1.0},
    "mixed": {"reverse_kl_topk": 1.0, "lightning": 0.1, "sft": 0.5},
}


def named_loss_cfg(name: str, tail_bucket: bool = True) -> TrainConfig:
    extra = {"lightning": {"importance": "ppo_clip", "normalization": "token"}} if name == "lightning_token_ppo" else {}
    return TrainConfig(student="s", shards="d", out="o", losses=NAMED_LOSS_SETS[name], tail_bucket=tail_bucket, **extra)


def ragged_records(vocab: int, n: int = 8, seed: int = 0):
    records = make_records(vocab, 4, num_rollouts=n, response_len=9, prompt_len=4, seed=seed)
    lengths = [9, 2, 5, 7, 1, 9, 3, 6][:n]
    records = [dataclasses.replace(r, token_ids=r.token_ids[: r.prompt_len + m],
                                   teacher_logprobs=r.teacher_logprobs[:m], behavior_logprobs=r.behavior_logprobs[:m],
                                   topk_ids=r.topk_ids[:m], topk_logprobs=r.topk_logprobs[:m],
                                   tail_logprob=r.tail_logprob[:m])
               for r, m in zip(records, lengths)]
    return records
