"""Streaming, shuffled, rank-split, resumable reader of teacher top-k shards.

Row groups ("units") are the unit of work. Each epoch, all units of the shard set are put in an
order drawn from (seed, epoch); reader number `rank * num_workers + worker` takes every
(world_size * num_workers)-th unit of that order, so readers never overlap and together cover every
unit. Records stream through a shuffle buffer of `shuffle_buffer` records (a record leaves the
buffer for a random slot's newcomer; the rest is shuffled at the end of the epoch), so memory holds
at most the buffer plus one decoded row group.

Resuming: the state yielded with a batch says how many records this reader had emitted in the epoch.
The buffer's behaviour depends only on record counts (from the Parquet footers) and the RNG, so
`start=state` replays it on (unit, row) handles without decoding anything, decodes just the row
groups whose rows are still in flight, and continues: exactly the batches an uninterrupted run
would have produced next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from storage.codecs import decode_columns, decode_table
from storage.errors import LopdUserError
from storage.records import TeacherRecord
from storage.shardset import CorruptShardError, ShardSet, corrupt_shard_message

Handle = tuple[int, int]  # (index into this reader's unit list for the epoch, row within the unit)
_VERIFIED: set[tuple[str, int, int]] = set()  # shards whose checksum this process has checked


@dataclass
class ReaderState:
    """Resume point of one reader: `position` records emitted in `epoch`, plus the settings it depends on."""

    epoch: int
    position: int
    seed: int
    rank: int
    world_size: int
    worker: int
    num_workers: int
    shuffle_buffer: int
    num_units: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ReaderState":
        return cls(**data)


class _BufferShuffle:
    """Shuffle-buffer order over handles; depends only on row counts and the RNG."""

    def __init__(self, unit_rows: list[int], size: int, rng: np.random.Generator):
        self.unit_rows, self.size, self.rng = unit_rows, size, rng
        self.buffer: list[Handle] = []
        self.unit, self.row = 0, 0  # next handle to stream in
        self.drain: list[Handle] | None = None

    def _next_input(self) -> Handle | None:
        while self.unit < len(self.unit_rows) and self.row >= self.unit_rows[self.unit]:
            self.unit, self.row = self.unit + 1, 0
        if self.unit >= len(self.unit_rows):
            return None
        handle = (self.unit, self.row)
        self.row += 1
        return handle

    def pop(self, on_enter: Callable[[int], None] | None = None) -> Handle | None:
        while self.drain is None:
            handle = self._next_input()
            if handle is None:
                order = self.rng.permutation(len(self.buffer))
                self.drain = [self.buffer[i] for i in order[::-1]]  # popped from the end
                self.buffer = []
                break
            if on_enter is not None and handle[1] == 0:
                on_enter(handle[0])
            if len(self.buffer) < self.size:
                self.buffer.append(handle)
                continue
            slot = int(self.rng.integers(self.size))
            out, self.buffer[slot] = self.buffer[slot], handle
            return out
        return self.drain.pop() if self.drain else None

    def in_flight(self) -> list[Handle]:
        """Handles already streamed in but not emitted, plus the unread rows of a partly read unit."""
        pending = list(self.buffer) + list(self.drain or [])
        if 0 < self.row and self.unit < len(self.unit_rows):
            pending += [(self.unit, r) for r in range(self.row, self.unit_rows[self.unit])]
        return pending


def _check_args(batch_size: int, shuffle_buffer: int, rank: int, world_size: int, worker: int,
                num_workers: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 1 (1 = no shuffling within the stream)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker={worker} must be in [0, num_workers={num_workers})")


class _Units:
    """All row groups of the complete shards, with lazy once-per-process checksum verification. need_topk=False
    reads the row groups without their top-k columns (no I/O or decompression for them) and decodes without."""

    def __init__(self, shard_set: ShardSet, verify: bool, need_topk: bool):
        self.shard_set, self.verify, self.need_topk = shard_set, verify, need_topk
        self.units: list[tuple[int, int]] = []
        self.rows: list[int] = []
        for index in shard_set.complete_indices():
            path = shard_set.shard_path(index)
            try:
                sizes = shard_set.row_group_sizes(index)
            except Exception as err:  # an unreadable footer is a corrupt shard, whatever pyarrow raises
                raise CorruptShardError(corrupt_shard_message(path, f"unreadable Parquet footer ({err})")) from err
            self.units += [(index, g) for g in range(len(sizes))]
            self.rows += sizes

    def read(self, unit: int) -> list[TeacherRecord]:
        index, group = self.units[unit]
        path = self.shard_set.shard_path(index)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if self.verify and key not in _VERIFIED:
            self.shard_set.verify_shard(index)
            _VERIFIED.add(key)
        try:
            parquet = pq.ParquetFile(path)
            columns = None if self.need_topk else decode_columns(parquet.schema_arrow, topk=False)
            table = parquet.read_row_group(group, columns=columns)
        except Exception as err:
            raise CorruptShardError(corrupt_shard_message(path, f"row group {group} unreadable ({err})")) from err
        return decode_table(table, topk=self.need_topk)


def iter_batches(
    shardset_or_root: ShardSet | Path | str,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle_buffer: int = 1024,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    num_epochs: int | None = None,
    start: ReaderState | None = None,
    verify: bool = True,
    drop_last: bool = False,
    need_topk: bool = True,
) -> Iterator[tuple[list[TeacherRecord], ReaderState]]:
    """Yield (batch of TeacherRecords, state to resume after it). Batches never span epochs; the
    last one of an epoch is short unless drop_last. num_epochs=None streams forever.

    Checks run when called, before the first batch: a shard set that is unfinished (manifest not complete,
    a listed or expected shard missing) or damaged (a file that does not parse or contradicts the others)
    raises IncompleteShardSetError / CorruptShardError naming the file and the fix. A shard's checksum is
    verified when it is first read (once per process; verify=False skips it).

    need_topk=False (no loss reads the teacher's top-k) skips the top-k columns: the records carry top-k arrays
    of shape [R, 0] and a zero tail, as a ``k = 0`` shard's do; the batches and resume states are the same."""
    _check_args(batch_size, shuffle_buffer, rank, world_size, worker, num_workers)
    shard_set = shardset_or_root if isinstance(shardset_or_root, ShardSet) else ShardSet.open(Path(shardset_or_root))
    shard_set.require_intact()
    units = _Units(shard_set, verify, need_topk)
    readers = world_size * num_workers
    if len(units.units) < readers:
        raise LopdUserError(
            f"{shard_set.root} has {len(units.units)} row groups for {readers} readers (world_size x num_workers): "
            "every reader needs at least one; write smaller row groups (ShardSet.write_shard row_group_size) or more "
            "shards"
        )
    state = ReaderState(0, 0, seed, rank, world_size, worker, num_workers, shuffle_buffer, len(units.units))
    if start is not None:
        _check_resume(start, state)
        state.epoch, state.position = start.epoch, start.position
    return _stream(units, state, batch_size, drop_last, num_epochs)


def _stream(units: _Units, state: ReaderState, batch_size: int, drop_last: bool,
            num_epochs: int | None) -> Iterator[tuple[list[TeacherRecord], ReaderState]]:
    while num_epochs is None or state.epoch < num_epochs:
        yield from _epoch_batches(units, state, batch_size, drop_last)
        state.epoch, state.position = state.epoch + 1, 0


def _check_resume(start: ReaderState, current: ReaderState) -> None:
    for field in ("seed", "rank", "world_size", "worker", "num_workers", "shuffle_buffer", "num_units"):
        if getattr(start, field) != getattr(current, field):
            raise LopdUserError(
                f"cannot resume exactly: the saved reader state has {field}={getattr(start, field)}, this reader has "
                f"{getattr(current, field)} (the shard set or the reader settings changed since the state was saved)"
            )


def _epoch_batches(units: _Units, state: ReaderState, batch_size: int,
                   drop_last: bool) -> Iterator[tuple[list[TeacherRecord], ReaderState]]:
    readers = state.world_size * state.num_workers
    order = np.random.default_rng([state.seed, state.epoch]).permutation(len(units.units))
    mine = [int(u) for u in order[state.rank * state.num_workers + state.worker :: readers]]
    rng = np.random.default_rng([state.seed, state.epoch, state.rank, state.worker, 1])
    shuffle = _BufferShuffle([units.rows[u] for u in mine], state.shuffle_buffer, rng)
    store: dict[Handle, TeacherRecord] = {}

    def enter(local_unit: int) -> None:
        for row, record in enumerate(units.read(mine[local_unit])):
            store[(local_unit, row)] = record

    for _ in range(state.position):  # replay on handles only
        if shuffle.pop() is None:
            return
    pending = shuffle.in_flight()
    for local_unit in sorted({u for u, _ in pending}):
        records = units.read(mine[local_unit])
        for u, row in pending:
            if u == local_unit:
                store[(u, row)] = records[row]

    batch: list[TeacherRecord] = []
    while (handle := shuffle.pop(enter)) is not None:
        batch.append(store.pop(handle))
        state.position += 1
        if len(batch) == batch_size:
            yield batch, ReaderState(**state.to_dict())
            batch = []
    if batch and not drop_last:
        yield batch, ReaderState(**state.to_dict())
