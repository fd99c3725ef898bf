"""Prefetching reader: the synchronous reader's batches and resume states, decoded ahead on a thread."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time

import pytest

from pipeline.config import TrainConfig
from pipeline.train.batching import Batch, collate, split_by_token_budget
from pipeline.train.distributed import DistInfo
from pipeline.train.sources import MixedShardBatches, ShardBatches
from pipeline.train.weighting import RolloutTable
from storage.codecs import encode_records
from storage.prefetch import prefetch, prefetch_batches
from storage.prompt_stats import load_prompt_stats
from storage.reader import ReaderState, iter_batches
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


# --- the trainer's shard sources: steps split and collated ahead -------------------------------------------------


@pytest.fixture(scope="module")
def ragged(tmp_path_factory) -> ShardSet:
    """Rollouts of 3 to 12 response tokens (the token budget groups them unevenly), 4 per prompt, with rewards."""
    shard_set = ShardSet.create(tmp_path_factory.mktemp("prefetch") / "r", "teacher_topk", {})
    for i in range(3):
        records = []
        for j, r in enumerate(make_records(50, 4, num_rollouts=16, response_len=12, prompt_len=2, seed=10 + i)):
            m = 3 + (7 * j) % 10
            records.append(dataclasses.replace(
                r, prompt_id=f"s{i}-{r.prompt_id}", token_ids=r.token_ids[: r.prompt_len + m],
                teacher_logprobs=r.teacher_logprobs[:m], behavior_logprobs=r.behavior_logprobs[:m],
                topk_ids=r.topk_ids[:m], topk_logprobs=r.topk_logprobs[:m], tail_logprob=r.tail_logprob[:m]))
        shard_set.write_shard(i, encode_records(records, "compact", 4, 50), row_group_size=4)
    shard_set.finalize(expected_shards=3)
    return shard_set


SPLITS = {"count": dict(grad_accum=2), "budget": dict(max_tokens_per_micro_batch=40),
          "packed": dict(max_tokens_per_micro_batch=40, packing=True)}


def _cfg(shards, split: str, prefetch_batches: int) -> TrainConfig:
    return TrainConfig(student="s", shards=shards, out="o", batch_size=8, seed=3, shuffle_buffer=6,
                       prefetch_batches=prefetch_batches, **SPLITS[split])


def _synchronous(cfg: TrainConfig, records, pad_id: int, rollouts) -> list[Batch]:
    """What ``train_step`` did inside the step before the sources prepared it."""
    groups = split_by_token_budget([len(r.token_ids) for r in records], cfg.max_tokens_per_micro_batch,
                                   cfg.grad_accum, packed=cfg.packing)
    return [collate([records[i] for i in g], pad_id, rollouts) for g in groups]


def _bits(batches: list[Batch]) -> list:
    """Every tensor of the micro-batches, bit for bit (NaN rewards included)."""
    return [[None if (v := getattr(b, f.name)) is None else (str(v.dtype), tuple(v.shape), v.numpy().tobytes())
             for f in dataclasses.fields(b)] for b in batches]


def _source(cfg: TrainConfig, mixed: bool, state, pad_id=None, rollouts=None):
    if mixed:
        return MixedShardBatches(cfg, DistInfo(), 8 // cfg.grad_accum, state, pad_id, rollouts)
    start = ReaderState.from_dict(state["reader"]) if state and state["reader"] else None
    return ShardBatches(cfg, DistInfo(), 8 // cfg.grad_accum, start, pad_id, rollouts)


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("mixed", [False, True], ids=["one-set", "mixed"])
def test_steps_prepared_ahead_equal_synchronous_collation_and_resume_exactly(shards, ragged, split, mixed):
    """The shard sources given ``pad_id`` hand out each step's micro-batches, split and collated on the prefetch
    thread, bit for bit those of collating the synchronous reader's records in the step (by count, by token
    budget, packed), with the same states; a source resumed from the state of the last step used (whatever was
    prepared ahead) continues exactly."""
    shards_of = [{"path": str(ragged.root), "weight": 3.0, "name": "r"},
                 {"path": str(shards.root), "weight": 1.0, "name": "s"}] if mixed else ragged.root
    rollouts = None if mixed else RolloutTable.from_table(load_prompt_stats(ragged, "k")[0])
    pad_id, steps, cut = 0, 22, 5  # 22 steps of 8: into the second epoch of the 144 (or 150 + 150) records
    cfg = _cfg(shards_of, split, 0)
    with contextlib.closing(_source(cfg, mixed, None)) as sync:
        want = []
        for _ in range(steps):
            want.append((_bits(_synchronous(cfg, sync.next_records(8, cfg.grad_accum), pad_id, rollouts)),
                         sync.state_dict()))
    rows = {batch[0][1][0] for batches, _ in want for batch in batches}  # input_ids' B of every micro-batch
    assert rows == {4} if split == "count" else len(rows) > 1  # the token budget groups the rollouts unevenly

    before = set(_prefetch_threads())
    got = []
    with contextlib.closing(_source(_cfg(shards_of, split, 3), mixed, None, pad_id, rollouts)) as ahead:
        assert ahead.prepared
        for _ in range(cut):
            got.append((_bits(ahead.next_micro_batches(8, cfg.grad_accum)), ahead.state_dict()))
        time.sleep(0.1)  # let the thread prepare further ahead than the steps used
        state = ahead.state_dict()
    with contextlib.closing(_source(_cfg(shards_of, split, 2), mixed, state, pad_id, rollouts)) as resumed:
        for _ in range(steps - cut):
            got.append((_bits(resumed.next_micro_batches(8, cfg.grad_accum)), resumed.state_dict()))
    assert got == want
    assert not set(_prefetch_threads()) - before


def test_a_source_reads_only_the_kind_it_was_made_for(ragged):
    cfg = _cfg(ragged.root, "count", 0)
    with contextlib.closing(_source(cfg, False, None, 0)) as prepared:
        with pytest.raises(RuntimeError, match="next_micro_batches"):
            prepared.next_records(8, 2)
    with contextlib.closing(_source(cfg, False, None)) as records:
        with pytest.raises(RuntimeError, match="next_records"):
            records.next_micro_batches(8, 2)


def test_data_stall_bench_reports_both_paths_on_a_tiny_case():
    """`lopd bench data-stall` on short rows: every case has the stall with and without prefetch (fractions in
    [0, 1]) and a positive prepare rate; figures are printed by the bench, never asserted against a time."""
    from pipeline.bench.stages import bench_data_stall

    result = bench_data_stall(ks=(0, 4), rows=4, rows_per_step=2, length=256, consumer_tokens_per_s=1e6)
    assert result["bench"] == "data-stall" and [c["k"] for c in result["cases"]] == [0, 4]
    for case in result["cases"]:
        for key in ("stall_fraction", "stall_fraction_after_first_step", "stall_fraction_prefetch",
                    "stall_fraction_prefetch_after_first_step"):
            assert 0.0 <= case[key] <= 1.0, key
        assert case["prepare_tokens_per_s"] > 0
