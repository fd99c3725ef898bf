"""Fixtures of the trainer's tests (the session fixtures are in tests/conftest.py)."""

from __future__ import annotations

import pytest

from storage.shardset import ShardSet
from tests.train.helpers import grouped_records, topk_shard_set


@pytest.fixture(scope="module")
def stats_shards(tmp_path_factory) -> ShardSet:
    return topk_shard_set(tmp_path_factory.mktemp("methods") / "shards", grouped_records())
