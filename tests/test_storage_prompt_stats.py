"""storage/prompt_stats.py: the per-rollout prompt statistics beside the shards: their values against the records,
written once and reused, recomputed for a changed set, and computed and used where they cannot be stored."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.stages.train import rollout_table
from storage.prompt_stats import STATS_FILE, compute_prompt_stats, load_prompt_stats
from storage.shardset import ShardSet
from tests.train.helpers import grouped_records, topk_shard_set, train_cfg


@pytest.fixture(scope="module")
def stats_shards(tmp_path_factory) -> ShardSet:
    return topk_shard_set(tmp_path_factory.mktemp("methods") / "shards", grouped_records())


def test_prompt_stats_values_against_the_records(stats_shards):
    records = grouped_records()
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
        assert col["reward_std"][i] == pytest.approx(rewards.std(ddof=1), abs=1e-7)  # the sample std, as GRPO's
        assert col["teacher_mean"][i] == pytest.approx(np.mean(r.teacher_logprobs.astype(np.float64)), rel=1e-6)
        assert col["behavior_mean"][i] == pytest.approx(np.mean(r.behavior_logprobs.astype(np.float64)), rel=1e-6)
    assert sorted(set(col["pass_rate"].tolist())) == [0.25, 0.5, 1.0]


def test_prompt_stats_are_written_once_reused_and_recomputed_for_a_changed_set(tmp_path):
    shards = topk_shard_set(tmp_path / "s", grouped_records())
    cfg = train_cfg(methods={"paced": {}})
    table, how = load_prompt_stats(shards, "data-1")
    assert how == "computed" and (tmp_path / "s" / STATS_FILE).exists()
    assert pq.read_table(tmp_path / "s" / STATS_FILE).schema.metadata[b"lopd.prompt_stats_key"] == b"data-1"
    mtime = (tmp_path / "s" / STATS_FILE).stat().st_mtime_ns
    again, how = load_prompt_stats(shards, "data-1")
    assert how == "read" and again.equals(table) and (tmp_path / "s" / STATS_FILE).stat().st_mtime_ns == mtime
    assert load_prompt_stats(shards, "data-2")[1] == "computed"  # another fingerprint: recomputed
    assert shards.problems() == []  # the stats file does not disturb the set's integrity checks
    assert rollout_table(cfg, shards, "data-2").pass_rate_R.shape == (12,)
    assert rollout_table(train_cfg(), shards, "data-2") is None  # nothing reads them: not even opened


def test_prompt_stats_that_cannot_be_stored_are_computed_and_used(tmp_path):
    """Where the file cannot be written (here a directory occupies its name, which fails for any user, root
    included; a read-only shard directory fails the same way for others), the statistics are still returned."""
    shards = topk_shard_set(tmp_path / "s", grouped_records())
    (tmp_path / "s" / STATS_FILE).mkdir()
    (tmp_path / "s" / STATS_FILE / "not-parquet").write_text("x")
    table, how = load_prompt_stats(shards, "data-1")
    assert how.startswith("computed (not stored: ")
    assert table.equals(compute_prompt_stats(shards).replace_schema_metadata(table.schema.metadata))
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "s").iterdir())
