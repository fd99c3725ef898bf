"""ShardSet: atomic shards, resume, refusal of mismatched metadata, crash safety, corruption detection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.codecs import codec_info, decode_table, encode_records
from storage.inspect import inspect_shards, verify_shards
from storage.reader import iter_batches
from storage.shardset import CorruptShardError, ShardSet, ShardSetMismatchError, ShardSetNotFoundError, WriteBehind
from storage.synthetic import make_records

WRITER = Path(__file__).parent / "storage_helpers" / "slow_writer.py"
META = {"teacher_fingerprint": "abc", "student_fingerprint": "def", **codec_info("compact", 8, 20)}


def _write(root: Path, shards: int = 3, meta: dict | None = None) -> ShardSet:
    shard_set = ShardSet.create(root, "teacher_topk", meta or META)
    for i in range(shards):
        records = make_records(20, 8, num_rollouts=6, response_len=5, seed=i)
        shard_set.write_shard(i, encode_records(records, "compact", 8, 20), row_group_size=2)
    shard_set.finalize(expected_shards=shards)
    return shard_set


def _run_writer(root: Path, shards: int, slow: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WRITER), str(root), str(shards), "--slow", str(slow)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_write_read_round_trip_and_files(tmp_path):
    shard_set = _write(tmp_path / "s")
    assert shard_set.complete_indices() == [0, 1, 2]
    info = shard_set.sidecar(1)
    path = shard_set.shard_path(1)
    assert info["rows"] == 6 and info["row_groups"] == 3 and info["bytes"] == path.stat().st_size
    assert info["response_tokens"] == 30 and info["tokens"] == 30 + 6 * 4 and len(info["sha256"]) == 64
    manifest = shard_set.manifest
    assert manifest["complete"] and manifest["kind"] == "teacher_topk" and manifest["metadata"] == META
    assert manifest["totals"]["rows"] == 18 and [s["index"] for s in manifest["shards"]] == [0, 1, 2]
    records = decode_table(shard_set.read_shard(1))
    assert [r.prompt_id for r in records] == [r.prompt_id
                                              for r in make_records(20, 8, num_rollouts=6, response_len=5, seed=1)]
    assert sum(t.num_rows for t in shard_set.iter_row_groups(1)) == 6


def test_shards_are_readable_without_lopd(tmp_path):
    import polars as pl

    shard_set = _write(tmp_path / "s", shards=1)
    path = shard_set.shard_path(0)
    kv = pq.ParquetFile(path).schema_arrow.metadata
    assert kv[b"lopd.kind"] == b"teacher_topk" and json.loads(kv[b"lopd.metadata"])["teacher_fingerprint"] == "abc"
    assert json.loads(kv[b"lopd.codec"])["codec"] == "compact"
    frame = pl.read_parquet(path)
    assert frame.height == 6 and frame["teacher_logprobs"].list.len().sum() == 30


def test_mismatched_metadata_is_refused_with_a_clear_message(tmp_path):
    _write(tmp_path / "s", shards=1)
    with pytest.raises(ShardSetMismatchError) as err:
        ShardSet.create(tmp_path / "s", "teacher_topk", {**META, "teacher_fingerprint": "xyz"})
    message = str(err.value)
    assert str(tmp_path / "s") in message and "metadata.teacher_fingerprint" in message
    assert '"abc"' in message and '"xyz"' in message and "new output directory" in message
    assert "student_fingerprint" not in message  # only the keys that differ
    with pytest.raises(ShardSetMismatchError, match="kind"):
        ShardSet.create(tmp_path / "s", "samples", META)


def test_resume_keeps_complete_shards_and_redoes_the_rest(tmp_path):
    shard_set = _write(tmp_path / "s", shards=2)
    before = {i: shard_set.shard_path(i).stat().st_mtime_ns for i in (0, 1)}
    resumed = ShardSet.create(tmp_path / "s", "teacher_topk", json.loads(json.dumps(META)))  # same, json-normalised
    todo = [i for i in range(4) if not resumed.is_complete(i)]
    assert todo == [2, 3]
    for i in todo:
        resumed.write_shard(i, encode_records(make_records(20, 8, num_rollouts=6, response_len=5, seed=i),
                                              "compact", 8, 20))
    assert resumed.finalize(expected_shards=4)["complete"]
    assert {i: shard_set.shard_path(i).stat().st_mtime_ns for i in (0, 1)} == before


def test_finalize_reports_missing_shards(tmp_path):
    shard_set = ShardSet.create(tmp_path / "s", "samples", {})
    table = encode_records(make_records(20, 8, num_rollouts=2, response_len=3), "plain", 8, 20)
    shard_set.write_shard(0, table)
    shard_set.write_shard(2, table)
    assert not shard_set.finalize()["complete"]  # gap at 1
    assert not shard_set.finalize(expected_shards=4)["complete"]
    shard_set.write_shard(1, table)
    assert shard_set.finalize(expected_shards=3)["complete"]


def test_open_fails_clearly_without_a_shard_set(tmp_path):
    with pytest.raises(ShardSetNotFoundError, match="does not exist"):
        ShardSet.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardSetNotFoundError, match="manifest.json"):
        ShardSet.open(tmp_path / "empty")
    ShardSet.create(tmp_path / "new", "teacher_topk", META)
    with pytest.raises(ShardSetNotFoundError, match="no complete shard"):
        ShardSet.open(tmp_path / "new")
    with pytest.raises(ShardSetNotFoundError):
        next(iter_batches(tmp_path / "empty", 4))


def test_create_removes_temp_files_of_dead_writers_only(tmp_path):
    shard_set = _write(tmp_path / "s", shards=1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "s" / f"shard-00001.parquet.tmp-{int(dead.stdout)}-7"
    stale_old_name = tmp_path / "s" / f"manifest.json.tmp-{int(dead.stdout)}"  # written before thread ids
    live = tmp_path / "s" / f"shard-00002.parquet.tmp-{os.getpid()}-{threading.get_ident()}"
    for path in (stale, stale_old_name, live):
        path.write_bytes(b"partial")
    ShardSet.create(shard_set.root, "teacher_topk", META)
    assert not stale.exists() and not stale_old_name.exists() and live.exists()


def test_threads_of_one_process_write_shards_of_one_set_at_once(tmp_path):
    """A thread-pool task runner writes the parts of one shard set from one process: every writer rebuilds
    the manifest after each shard, and no writer may rename another's temp file away."""
    table = encode_records(make_records(20, 8, num_rollouts=2, response_len=3), "plain", 8, 20)
    errors: list[Exception] = []

    def write_part(part: int) -> None:
        try:
            shard_set = ShardSet.create(tmp_path / "s", "teacher_topk", META)
            for index in range(part, 32, 4):
                shard_set.write_shard(index, table)
        except Exception as err:  # collected: an exception in a thread would not fail the test
            errors.append(err)

    threads = [threading.Thread(target=write_part, args=(part,)) for part in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ShardSet.open(tmp_path / "s").finalize(expected_shards=32)["complete"]
    assert verify_shards(tmp_path / "s") == [] and not list((tmp_path / "s").glob("*.tmp-*"))


def test_sigkill_mid_shard_then_rerun_matches_uninterrupted_run(tmp_path):
    reference = _run_writer(tmp_path / "ref", 5)
    assert reference.wait(60) == 0, reference.stderr.read().decode()
    root = tmp_path / "killed"
    writer = _run_writer(root, 5, slow=0.3)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill while a shard's temp file is on disk, after two shards are complete
        if root.exists() and len(list(root.glob("shard-*.json"))) >= 2 and list(root.glob("shard-*.parquet.tmp-*")):
            break
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)
    interrupted = ShardSet(root, "teacher_topk", {})
    complete_before = interrupted.complete_indices()
    assert 2 <= len(complete_before) < 5 and list(root.glob("shard-*.parquet.tmp-*"))
    mtimes = {i: interrupted.shard_path(i).stat().st_mtime_ns for i in complete_before}
    assert any("no sidecar" in p or "not marked complete" in p for p in verify_shards(root))

    rerun = _run_writer(root, 5)
    out, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, err.decode()
    assert f"wrote {complete_before[0]}" not in out.decode()  # complete shards were skipped, not redone
    assert {i: interrupted.shard_path(i).stat().st_mtime_ns for i in complete_before} == mtimes
    assert not list(root.glob("*.tmp-*")) and verify_shards(root) == []
    ref, got = ShardSet.open(tmp_path / "ref"), ShardSet.open(root)
    assert got.complete_indices() == ref.complete_indices() == list(range(5))
    for i in range(5):
        assert got.shard_path(i).read_bytes() == ref.shard_path(i).read_bytes(), f"shard {i} differs"


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 3] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_corruption_is_detected_by_verify_read_and_reader(tmp_path, how):
    shard_set = _write(tmp_path / "s")
    assert verify_shards(shard_set.root) == []
    _corrupt(shard_set.shard_path(1), how)
    problems = verify_shards(shard_set.root)
    assert len(problems) == 1 and "shard-00001.parquet" in problems[0] and "rerun" in problems[0]
    assert ("truncated" in problems[0]) == (how == "truncate") and ("sha256" in problems[0]) == (how == "bitflip")
    with pytest.raises(CorruptShardError, match="shard-00001.parquet.*Delete shard-00001.parquet and shard-00001.json"):
        shard_set.read_shard(1)
    with pytest.raises(CorruptShardError, match="shard-00001.parquet"):
        for _ in iter_batches(shard_set.root, 4, num_epochs=1, shuffle_buffer=1):
            pass


def test_verify_reports_missing_sidecar_and_inconsistent_metadata(tmp_path):
    shard_set = _write(tmp_path / "s")
    shard_set.sidecar_path(2).unlink()
    # shard 0 rewritten by a run with another teacher, sidecar updated to match: only the metadata can tell
    other = ShardSet(shard_set.root, "teacher_topk", {**META, "teacher_fingerprint": "other"})
    other.write_shard(0, shard_set.read_shard(0))
    shard_set.finalize(expected_shards=3)  # the manifest keeps the original metadata
    problems = "\n".join(verify_shards(shard_set.root))
    assert "shard-00002.parquet: no sidecar" in problems
    assert "shard-00000.parquet: Parquet metadata differs from the manifest in teacher_fingerprint" in problems


def test_inspect_summarises_the_shard_set(tmp_path):
    shard_set = _write(tmp_path / "s")
    summary = inspect_shards(shard_set.root)
    assert summary["complete"] and summary["shards"] == 3 and summary["rows"] == 18
    assert summary["codec"] == "compact" and summary["k"] == 8 and summary["vocab_size"] == 20
    assert summary["fingerprints"] == {"teacher_fingerprint": "abc", "student_fingerprint": "def"}
    total_bytes = sum(shard_set.sidecar(i)["bytes"] for i in range(3))
    assert summary["bytes_per_token"] == pytest.approx(total_bytes / 90)
    assert ("token_ids: list<element: int32>" in summary["schema"]
            or any(s.startswith("token_ids") for s in summary["schema"]))
    assert set(summary["column_bytes_per_token"]) >= {"token_ids", "ck_bits", "ck_abs"}
    json.dumps(summary)  # JSON-able
    assert np.isfinite(sum(summary["column_bytes_per_token"].values()))


def _encoded(seed: int):
    return encode_records(make_records(20, 8, num_rollouts=6, response_len=5, seed=seed), "compact", 8, 20)


def test_write_behind_writes_the_same_shards_and_surfaces_writer_errors(tmp_path):
    direct = _write(tmp_path / "direct")
    behind = ShardSet.create(tmp_path / "behind", "teacher_topk", META)
    with WriteBehind(behind) as writer:
        for i in range(3):
            writer.submit(i, lambda i=i: _encoded(i))
    assert [w["index"] for w in writer.written] == [0, 1, 2]
    for i in range(3):
        assert behind.read_shard(i).equals(direct.read_shard(i))

    # a failing encode is raised to the caller; the shard queued before it is durable, none after it is written
    failing = ShardSet.create(tmp_path / "failing", "teacher_topk", META)

    def bad_table():
        raise ValueError("codec failed on shard 1")

    with pytest.raises(ValueError, match="codec failed on shard 1"):
        with WriteBehind(failing) as writer:
            writer.submit(0, lambda: _encoded(0))
            writer.submit(1, bad_table)
            writer.submit(2, lambda: _encoded(2))  # waits for shard 1 first, which raises
    assert failing.complete_indices() == [0]

    # an error in the caller's loop still leaves every handed-over shard written
    body = ShardSet.create(tmp_path / "body", "teacher_topk", META)
    with pytest.raises(RuntimeError, match="engine died"):
        with WriteBehind(body, max_pending=2) as writer:
            writer.submit(0, lambda: _encoded(0))
            writer.submit(1, lambda: _encoded(1))
            raise RuntimeError("engine died")
    assert body.complete_indices() == [0, 1]


def _pieces(table, cuts: list[int]) -> list:
    """The table cut at the given rows (empty pieces where two cuts coincide)."""
    bounds = [0, *cuts, table.num_rows]
    return [table.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("cuts", [[], [1], [3, 3, 4], [0, 5, 11], [2, 4, 6, 8, 10]])
def test_streamed_shard_has_the_bytes_of_a_one_table_write(tmp_path, cuts):
    """A shard written piece by piece (row groups spanning pieces, empty pieces) is byte for byte the
    one-table write of the concatenation, with the same sidecar; both verify."""
    table = encode_records(make_records(20, 8, num_rollouts=12, response_len=5, seed=3), "compact", 8, 20)
    for row_group_size in (None, 5):
        one = ShardSet.create(tmp_path / f"one-{row_group_size}", "teacher_topk", META)
        one.write_shard(0, table, row_group_size=row_group_size)
        streamed = ShardSet.create(tmp_path / f"streamed-{row_group_size}", "teacher_topk", META)
        with streamed.shard_writer(0, row_group_size=row_group_size) as shard:
            for piece in _pieces(table, cuts):
                shard.write(piece)
        assert streamed.shard_path(0).read_bytes() == one.shard_path(0).read_bytes()
        assert {**shard.info, "created": ""} == {**one.sidecar(0), "created": ""} == {**streamed.sidecar(0),
                                                                                      "created": ""}
        assert shard.info["row_groups"] == (1 if row_group_size is None else 3)
        for s in (one, streamed):
            s.finalize(expected_shards=1)
            assert verify_shards(s.root) == []
        assert streamed.read_shard(0).replace_schema_metadata(None).equals(table.replace_schema_metadata(None))


def test_streamed_row_groups_follow_the_first_piece(tmp_path, monkeypatch):
    """Without a row_group_size, groups hold TARGET_ROW_GROUP_BYTES of the first piece's rows, whatever the
    later pieces' sizes; the rows read back are the concatenation's."""
    import storage.shardset as shardset

    table = encode_records(make_records(20, 8, num_rollouts=12, response_len=5, seed=3), "compact", 8, 20)
    first = table.slice(0, 4)
    monkeypatch.setattr(shardset, "TARGET_ROW_GROUP_BYTES", 3 * (first.nbytes // first.num_rows))
    shard_set = ShardSet.create(tmp_path / "s", "teacher_topk", META)
    with shard_set.shard_writer(0) as shard:
        for piece in _pieces(table, [4, 5, 9]):
            shard.write(piece)
    assert shard_set.row_group_sizes(0) == [3, 3, 3, 3]
    assert shard_set.read_shard(0).replace_schema_metadata(None).equals(table.replace_schema_metadata(None))


def test_a_shard_failing_before_close_leaves_nothing(tmp_path):
    """An error between pieces removes the temp file: no shard, no sidecar, the other shards intact; a
    piece with another schema is refused; a writer given no table refuses to close."""
    shard_set = _write(tmp_path / "s", shards=1)
    before = {p.name: p.read_bytes() for p in shard_set.root.iterdir()}
    with pytest.raises(RuntimeError, match="engine died"):
        with shard_set.shard_writer(1, row_group_size=2) as shard:
            shard.write(_encoded(1))  # three row groups already in the temp file
            assert list(shard_set.root.glob("shard-00001.parquet.tmp-*"))
            raise RuntimeError("engine died")
    assert {p.name: p.read_bytes() for p in shard_set.root.iterdir()} == before
    with pytest.raises(ValueError, match="does not match the shard"):
        with shard_set.shard_writer(1) as shard:
            shard.write(_encoded(1))
            shard.write(_encoded(1).drop_columns(["reward"]))
    with pytest.raises(ValueError, match="no table was written"):
        shard_set.shard_writer(1).close()
    assert {p.name: p.read_bytes() for p in shard_set.root.iterdir()} == before
    assert verify_shards(shard_set.root) == []


def test_write_behind_streams_pieces_and_drops_an_unfinished_shard(tmp_path):
    """Pieces submitted with last=False are appended in order and make the shard write_shard makes of their
    concatenation; a failing piece leaves its shard absent (no temp file) and stops the writer."""
    import pyarrow as pa

    whole = [_encoded(i) for i in range(2)]
    direct = ShardSet.create(tmp_path / "direct", "teacher_topk", META)
    for i, table in enumerate(whole):
        direct.write_shard(i, table)
    streamed = ShardSet.create(tmp_path / "streamed", "teacher_topk", META)
    streamed_writer = WriteBehind(streamed)
    with streamed_writer as writer:
        for i, table in enumerate(whole):
            pieces = _pieces(table, [1, 2, 5])
            for j, piece in enumerate(pieces):
                writer.submit(i, lambda piece=piece: piece, last=j == len(pieces) - 1)
    assert [w["index"] for w in streamed_writer.written] == [0, 1]
    for i in range(2):
        assert streamed.read_shard(i).equals(direct.read_shard(i))
    streamed.finalize(expected_shards=2)
    assert verify_shards(streamed.root) == []

    failing = ShardSet.create(tmp_path / "failing", "teacher_topk", META)

    def bad_piece() -> pa.Table:
        raise ValueError("codec failed on a piece of shard 1")

    with pytest.raises(ValueError, match="codec failed"):
        with WriteBehind(failing, max_pending=3) as writer:
            writer.submit(0, lambda: _encoded(0))
            writer.submit(1, lambda: _encoded(1), last=False)
            writer.submit(1, bad_piece, last=False)
            writer.submit(1, lambda: _encoded(1))  # would complete shard 1 with a piece missing: refused
    assert failing.complete_indices() == [0]
    assert sorted(p.name for p in failing.root.iterdir()) == ["manifest.json", "shard-00000.json",
                                                               "shard-00000.parquet"]

    # the caller fails mid-shard: the complete shard stays, the unfinished one leaves no file
    body = ShardSet.create(tmp_path / "body", "teacher_topk", META)
    with pytest.raises(RuntimeError, match="engine died"):
        with WriteBehind(body) as writer:
            writer.submit(0, lambda: _encoded(0))
            writer.submit(1, lambda: _encoded(1), last=False)
            raise RuntimeError("engine died")
    assert body.complete_indices() == [0] and not list(body.root.glob("*.tmp-*"))
    assert not body.shard_path(1).exists()
