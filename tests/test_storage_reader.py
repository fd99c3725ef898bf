"""Streaming reader: deterministic, rank-disjoint, exactly resumable, bounded memory."""

from __future__ import annotations

import json
import shutil

import pytest

import storage.reader as reader_mod
from storage.codecs import TOPK_COLUMNS, encode_records
from storage.inspect import verify_shards
from storage.reader import ReaderState, iter_batches
from storage.shardset import CorruptShardError, IncompleteShardSetError, ShardSet
from storage.synthetic import make_records

ROWS_PER_SHARD, SHARDS, ROW_GROUP = 20, 3, 4  # 15 row groups, 60 records


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> ShardSet:
    shard_set = ShardSet.create(tmp_path_factory.mktemp("reader") / "s", "teacher_topk", {})
    for i in range(SHARDS):
        records = make_records(20, 4, num_rollouts=ROWS_PER_SHARD, response_len=3, prompt_len=2, seed=i)
        for j, r in enumerate(records):
            r.prompt_id = f"s{i}-r{j}"
        shard_set.write_shard(i, encode_records(records, "plain", 4, 20), row_group_size=ROW_GROUP)
    shard_set.finalize(expected_shards=SHARDS)
    return shard_set


def _ids(batches) -> list[list[str]]:
    return [[r.prompt_id for r in batch] for batch, _ in batches]


def _flat(batches) -> list[str]:
    return [pid for batch in _ids(batches) for pid in batch]


def test_deterministic_per_seed_and_epoch(shards):
    a = list(iter_batches(shards.root, 7, seed=3, shuffle_buffer=8, num_epochs=2))
    b = list(iter_batches(shards.root, 7, seed=3, shuffle_buffer=8, num_epochs=2))
    assert _ids(a) == _ids(b)
    epoch0 = [pid for (batch, state) in a if state.epoch == 0 for pid in (r.prompt_id for r in batch)]
    epoch1 = [pid for (batch, state) in a if state.epoch == 1 for pid in (r.prompt_id for r in batch)]
    assert sorted(epoch0) == sorted(epoch1) and len(epoch0) == SHARDS * ROWS_PER_SHARD
    assert epoch0 != epoch1  # a new order each epoch
    other_seed = _flat(iter_batches(shards.root, 7, seed=4, shuffle_buffer=8, num_epochs=1))
    assert other_seed != epoch0 and sorted(other_seed) == sorted(epoch0)
    assert [len(batch) for batch, state in a if state.epoch == 0] == [7] * 8 + [4]


@pytest.mark.parametrize("world_size,num_workers", [(3, 1), (2, 2)])
def test_ranks_and_workers_are_disjoint_and_cover_everything(shards, world_size, num_workers):
    for epoch in range(2):
        seen = []
        for rank in range(world_size):
            for worker in range(num_workers):
                stream = iter_batches(shards.root, 5, seed=1, shuffle_buffer=6, rank=rank, world_size=world_size,
                                      worker=worker, num_workers=num_workers, num_epochs=epoch + 1)
                seen.append([pid for batch, state in stream if state.epoch == epoch
                             for pid in (r.prompt_id for r in batch)])
        flat = [pid for part in seen for pid in part]
        assert len(flat) == len(set(flat)) == SHARDS * ROWS_PER_SHARD
        assert all(part for part in seen)


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 5, 6, 10, 16])
def test_resume_from_any_state_equals_uninterrupted(shards, cut):
    """Rank 1 of 2 gets 7 row groups = 28 records = 6 batches of 5 per epoch (the last one short); the
    buffer of 10 drains during batches 3-5. Cuts inside an epoch, in the drain phase, at its end."""
    kwargs = dict(seed=11, shuffle_buffer=10, rank=1, world_size=2, num_epochs=3)
    full = list(iter_batches(shards.root, 5, **kwargs))
    assert [len(b) for b, _ in full] == [5, 5, 5, 5, 5, 3] * 3
    state = ReaderState.from_dict(full[cut][1].to_dict())  # through JSON-able dict, like a checkpoint
    resumed = list(iter_batches(shards.root, 5, start=state, **kwargs))
    assert _ids(resumed) == _ids(full[cut + 1 :])
    assert [s.to_dict() for _, s in resumed] == [s.to_dict() for _, s in full[cut + 1 :]]


def _fields(batches, topk: bool) -> list:
    def row(r):
        key = (r.prompt_id, r.sample_index, r.prompt_len, r.reward, r.token_ids.tobytes(),
               r.teacher_logprobs.tobytes(), r.behavior_logprobs.tobytes())
        return key + ((r.topk_ids.tobytes(), r.topk_logprobs.tobytes(), r.tail_logprob.tobytes()) if topk else ())
    return [([row(r) for r in batch], state.to_dict()) for batch, state in batches]


@pytest.mark.parametrize("codec", ["plain", "compact"])
def test_without_topk_reads_no_topk_columns_and_keeps_the_rest(shards, tmp_path, codec, monkeypatch):
    """need_topk=False: same non-top-k fields, same batches and resume states as a full read (also resumed),
    top-k arrays [R, 0]; the Parquet reads name no top-k column."""
    if codec == "plain":
        shard_set = shards
    else:
        shard_set = ShardSet.create(tmp_path / "c", "teacher_topk", {})
        for i in range(2):
            shard_set.write_shard(i, encode_records(make_records(20, 4, num_rollouts=12, response_len=3, prompt_len=2,
                                                                 seed=i), "compact", 4, 20), row_group_size=ROW_GROUP)
        shard_set.finalize(expected_shards=2)
    kwargs = dict(seed=5, shuffle_buffer=6, rank=1, world_size=2, num_epochs=2)
    full = list(iter_batches(shard_set.root, 3, **kwargs))
    columns_read = []
    original = reader_mod.pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        columns_read.append(columns)
        return original(self, i, columns=columns, **kw)

    monkeypatch.setattr(reader_mod.pq.ParquetFile, "read_row_group", spy)
    lean = list(iter_batches(shard_set.root, 3, need_topk=False, **kwargs))
    assert _fields(lean, topk=False) == _fields(full, topk=False)
    assert all(r.topk_ids.shape == (3, 0) and r.topk_logprobs.shape == (3, 0) and not r.tail_logprob.any()
               for batch, _ in lean for r in batch)
    assert columns_read and all(c is not None and not set(c) & set(TOPK_COLUMNS[codec]) for c in columns_read)
    assert {"token_ids", "teacher_logprobs", "behavior_logprobs"} <= set(columns_read[0])
    resumed = list(iter_batches(shard_set.root, 3, need_topk=False, start=full[4][1], **kwargs))
    assert _fields(resumed, topk=False) == _fields(full[5:], topk=False)


def test_resume_refuses_changed_settings(shards):
    _, state = next(iter_batches(shards.root, 4, seed=0))
    with pytest.raises(ValueError, match="shuffle_buffer"):
        next(iter_batches(shards.root, 4, seed=0, shuffle_buffer=3, start=state))
    with pytest.raises(ValueError, match="world_size"):
        next(iter_batches(shards.root, 4, seed=0, world_size=2, start=state))


def test_shuffle_buffer_is_bounded(shards, monkeypatch):
    stream_order = _flat(iter_batches(shards.root, 60, seed=2, shuffle_buffer=1, num_epochs=1))
    shuffled = _flat(iter_batches(shards.root, 60, seed=2, shuffle_buffer=6, num_epochs=1))
    assert shuffled != stream_order and sorted(shuffled) == sorted(stream_order)
    position = {pid: i for i, pid in enumerate(shuffled)}
    # a record can leave the buffer no earlier than when the buffer's worth of later records arrived
    assert all(position[pid] >= i - 6 for i, pid in enumerate(stream_order))

    reads = []
    original = reader_mod._Units.read
    monkeypatch.setattr(reader_mod._Units, "read", lambda self, unit: reads.append(unit) or original(self, unit))
    stream = iter_batches(shards.root, 2, seed=2, shuffle_buffer=6, num_epochs=1)
    next(stream)
    assert len(reads) == 2  # 6 buffered + 1 arriving record span 2 row groups of 4: nothing else was read
    list(stream)
    assert sorted(reads) == list(range(SHARDS * ROWS_PER_SHARD // ROW_GROUP))  # each row group read once


def test_fails_early_with_too_few_row_groups(shards):
    with pytest.raises(ValueError, match="15 row groups for 16 readers"):
        next(iter_batches(shards.root, 4, world_size=8, num_workers=2))
    with pytest.raises(ValueError, match="rank=2"):
        next(iter_batches(shards.root, 4, rank=2, world_size=2))


def _records(root) -> list[str]:
    return _flat(iter_batches(root, 60, seed=0, shuffle_buffer=1, num_epochs=1))


@pytest.mark.parametrize("damage, error, names", [
    ("sidecar", IncompleteShardSetError,
     "1 of 3 expected shards missing (first: shard-00001.parquet, no sidecar shard-00001.json)"),
    ("both", IncompleteShardSetError, "1 of 3 expected shards missing (first: shard-00001.parquet"),
    ("parquet", CorruptShardError, "shard-00001.parquet: missing although its sidecar exists"),
    ("unfinished", IncompleteShardSetError, "not marked complete"),
])
def test_a_shard_set_with_a_missing_shard_is_refused_before_the_first_batch(shards, tmp_path, damage, error, names):
    """The manifest says complete with 3 shards; a deleted sidecar used to make the reader skip that shard
    silently (40 of 60 records). Now the call itself refuses, naming the shard and the fix."""
    root = tmp_path / "s"
    shutil.copytree(shards.root, root)
    assert len(_records(root)) == SHARDS * ROWS_PER_SHARD
    if damage in ("sidecar", "both"):
        (root / "shard-00001.json").unlink()
    if damage in ("parquet", "both"):
        (root / "shard-00001.parquet").unlink()
    if damage == "unfinished":  # a writer that stopped before finalize(): the manifest is not complete
        manifest = json.loads((root / "manifest.json").read_text())
        (root / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(error) as refused:
        iter_batches(root, 4)
    assert names in str(refused.value) and "rerun the stage" in str(refused.value)
    assert any(names in p for p in verify_shards(root))
    with pytest.raises(error):
        iter_batches(ShardSet(root, "teacher_topk", {}), 4)  # an open ShardSet object is checked the same way
