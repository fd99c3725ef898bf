"""Prefetching reader: the synchronous reader's batches and resume states, decoded ahead on a thread."""

from __future__ import annotations

import threading
import time

import pytest

from storage.codecs import encode_records
from storage.prefetch import prefetch, prefetch_batches
from storage.reader import iter_batches
from storage.shardset import ShardSet
from storage.synthetic import make_records


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> ShardSet:
    shard_set = ShardSet.create(tmp_path_factory.mktemp("prefetch") / "s", "teacher_topk", {})
    for i in range(3):
        records = make_records(50, 4, num_rollouts=16, response_len=5, prompt_len=2, seed=i)
        for j, r in enumerate(records):
            r.prompt_id = f"s{i}-r{j}"
        shard_set.write_shard(i, encode_records(records, "compact", 4, 50), row_group_size=4)
    shard_set.finalize(expected_shards=3)
    return shard_set


def _key(batches) -> list:
    return [([(r.prompt_id, r.topk_ids.tobytes(), r.topk_logprobs.tobytes(), r.teacher_logprobs.tobytes())
              for r in batch],
             state.to_dict()) for batch, state in batches]


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lopd-prefetch"]


def test_same_batches_and_states_as_the_synchronous_reader(shards):
    kw = dict(seed=1, shuffle_buffer=6, num_epochs=2, rank=1, world_size=2)
    before = set(_prefetch_threads())  # other tests' threads are theirs to stop
    assert _key(prefetch_batches(shards.root, 5, depth=3, **kw)) == _key(iter_batches(shards.root, 5, **kw))
    assert not set(_prefetch_threads()) - before


def test_resume_after_n_batches_is_exact(shards):
    kw = dict(seed=2, shuffle_buffer=6, num_epochs=2)
    full = _key(iter_batches(shards.root, 5, **kw))
    stream = prefetch_batches(shards.root, 5, depth=4, **kw)
    used = [next(stream) for _ in range(7)]  # the thread has decoded further ahead
    stream.close()
    resumed = prefetch_batches(shards.root, 5, depth=2, start=used[-1][1], **kw)
    assert _key(used) + _key(resumed) == full


def test_errors_reach_the_consumer_and_early_exit_stops_the_thread():
    before = set(_prefetch_threads())

    def failing():
        yield 1
        yield 2
        raise ValueError("corrupt row group")

    got = []
    with pytest.raises(ValueError, match="corrupt row group"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1, 2]

    produced = []

    def counting():
        for i in range(1000):
            produced.append(i)
            yield i

    stream = prefetch(counting(), depth=2)
    assert next(stream) == 0
    time.sleep(0.3)
    assert len(produced) <= 1 + 2 + 1  # the consumed item, a full queue, one waiting to be put
    stream.close()
    assert not set(_prefetch_threads()) - before and len(produced) < 1000
    with pytest.raises(ValueError, match="depth"):
        next(prefetch([1], depth=0))
