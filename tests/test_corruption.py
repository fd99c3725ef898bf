"""Randomised corruption of every file of a real shard set (Parquet shards, sidecars, manifest): each trial
ends either as a named problem from ``verify_shards`` AND a refusal (a ShardSetError) from the reader, or with
records and metadata from the reader identical to the intact set's. Zero crashes, zero silent outcomes."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from storage.codecs import codec_info, encode_records
from storage.inspect import verify_shards
from storage.reader import iter_batches
from storage.records import TeacherRecord
from storage.shardset import ShardSet, ShardSetError
from storage.synthetic import make_records

MODES = ("bitflip", "truncate", "delete", "garbage")
TRIALS_PER_CASE = 16  # 5 files x 4 modes x 16 = 320 trials
SEED = 1234


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    shard_set = ShardSet.create(tmp_path_factory.mktemp("pristine") / "s", "teacher_topk",
                                {"teacher_fingerprint": "abc", **codec_info("compact", 4, 50)})
    for i in range(2):
        records = make_records(50, 4, num_rollouts=6, response_len=5, prompt_len=3, seed=i)
        shard_set.write_shard(i, encode_records(records, "compact", 4, 50), row_group_size=3)
    shard_set.finalize(expected_shards=2)
    return shard_set.root


def _key(records: list[TeacherRecord]) -> list[tuple]:
    fields = TeacherRecord.__dataclass_fields__
    return [tuple((np.asarray(v).dtype.str, np.asarray(v).shape, np.asarray(v).tobytes())
                  if isinstance(v := getattr(r, f), np.ndarray) else v for f in fields) for r in records]


def _read(root: Path) -> tuple:
    """What a consumer gets: kind, metadata and every record in reader order."""
    shard_set = ShardSet.open(root)
    records = [r for batch, _ in iter_batches(root, 5, seed=0, shuffle_buffer=4, num_epochs=1) for r in batch]
    return shard_set.kind, shard_set.metadata, _key(records)


def _corrupt(path: Path, mode: str, rng: np.random.Generator) -> None:
    data = bytearray(path.read_bytes())
    if mode == "bitflip":
        data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
    elif mode == "truncate":
        data = data[: rng.integers(len(data))]
    elif mode == "delete":
        path.unlink()
        return
    elif rng.random() < 0.25:  # garbage: the whole file replaced
        data = bytearray(rng.integers(0, 256, int(rng.integers(1, 2 * len(data))), dtype=np.uint8).tobytes())
    else:  # garbage: a span overwritten
        start, span = int(rng.integers(len(data))), int(rng.integers(1, 33))
        data[start:start + span] = rng.integers(0, 256, span, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def test_every_corruption_is_named_and_refused_or_harmless(pristine, tmp_path):
    assert verify_shards(pristine) == []
    reference = _read(pristine)
    files = sorted(p.name for p in pristine.iterdir())
    assert files == ["manifest.json", "shard-00000.json", "shard-00000.parquet", "shard-00001.json",
                     "shard-00001.parquet"]
    rng = np.random.default_rng(SEED)
    outcomes: Counter = Counter()
    failures = []
    for trial, (name, mode) in enumerate((n, m) for n in files for m in MODES for _ in range(TRIALS_PER_CASE)):
        root = tmp_path / f"t{trial}"
        shutil.copytree(pristine, root)
        _corrupt(root / name, mode, rng)
        where = f"trial {trial}: {mode} {name}"
        try:
            problems = verify_shards(root)
        except Exception as err:  # noqa: BLE001 - any exception is a crash of verify
            failures.append(f"{where}: verify crashed with {type(err).__name__}: {err}")
            continue
        if any(str(root) not in p for p in problems):
            failures.append(f"{where}: a problem names no file of the set: {problems}")
        try:
            got = _read(root)
        except ShardSetError as err:
            outcomes["refused"] += 1
            if not problems:
                failures.append(f"{where}: the reader refused ({err}) but verify found nothing")
            if str(root) not in str(err):
                failures.append(f"{where}: the refusal names no file: {err}")
            continue
        except Exception as err:  # noqa: BLE001 - any other exception is a crash of the reader
            failures.append(f"{where}: reader crashed with {type(err).__name__}: {err}")
            continue
        if got != reference:
            failures.append(f"{where}: SILENT: the reader yielded other records or metadata; verify said {problems}")
        else:
            outcomes["identical"] += 1
    assert not failures, ("\n".join(failures[:20])
                          + f"\n({len(failures)} failures of {len(files) * len(MODES) * TRIALS_PER_CASE})")
    assert sum(outcomes.values()) == 320 and outcomes["refused"] > 250, outcomes
