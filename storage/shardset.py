"""A directory of Parquet shards written atomically, with one sidecar per complete shard.

Layout of a shard set directory::

    shard-00000.parquet   the data (zstd; dataset metadata also in the Parquet key-value metadata)
    shard-00000.json      sidecar: rows, tokens, bytes, sha256 of the file bytes; written last
    manifest.json         kind, metadata, shard list, totals, complete flag (a summary)

The sidecars are the truth: a shard is complete iff its sidecar exists, so a writer killed at any
moment leaves at worst a shard without a sidecar (redone on resume) and `*.tmp-<pid>` files
(removed by the next `create()`). manifest.json is rebuilt from all sidecars after each shard and by
`finalize()`, so writers of different shards of one directory (e.g. parallel Prefect workers) do not
lose each other's shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KV_KIND = b"lopd.kind"
KV_METADATA = b"lopd.metadata"
KV_FORMAT = b"lopd.format_version"
DEFAULT_ZSTD_LEVEL = 3
# Row groups are the reader's unit of shuffling and rank splitting: small enough to split a shard
# across ranks and bound reader memory, large enough to keep Parquet overhead negligible.
TARGET_ROW_GROUP_BYTES = 4 << 20
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.json$")
_TMP_RE = re.compile(r"\.tmp-(\d+)$")


class ShardSetError(Exception):
    """Base class of shard set errors."""


class ShardSetNotFoundError(ShardSetError, FileNotFoundError):
    """The directory holds no shard set (no manifest.json / no complete shard)."""


class ShardSetMismatchError(ShardSetError):
    """create() found an existing shard set whose kind or metadata differ from the requested ones."""


class CorruptShardError(ShardSetError):
    """A shard's bytes do not match its sidecar (truncated, modified or unreadable)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def sidecar_name(index: int) -> str:
    return f"shard-{index:05d}.json"


def normalise(value: Any) -> Any:
    """JSON round trip: what compares equal after being written and read back."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except TypeError as err:
        raise ValueError(f"shard set metadata must be JSON-serialisable (convert paths and numpy values first): {err}") from err


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mismatch_message(root: Path, old: dict, new: dict) -> str:
    lines = [f"{root} already holds a shard set with different settings:"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            lines.append(f"  {key}: existing {json.dumps(old.get(key))} vs requested {json.dumps(new.get(key))}")
    lines.append("Pick a new output directory, or delete the old one to start over.")
    return "\n".join(lines)


def _float_leaf_paths(schema: pa.Schema) -> list[str]:
    """Parquet column paths of float32/float64 leaves (top level or list elements): byte-stream-split
    groups their exponent bytes together, which zstd then compresses (random mantissa bytes stay
    raw). Not float16: byte-stream-split of 2-byte fixed-size values is too recent for some readers."""
    wide = (pa.float32(), pa.float64())
    paths = []
    for field in schema:
        t = field.type
        if pa.types.is_list(t) and t.value_type in wide:
            paths.append(f"{field.name}.list.element")
        elif t in wide:
            paths.append(field.name)
    return paths


class ShardSet:
    """A directory of Parquet shards; see the module docstring for the layout."""

    def __init__(self, root: Path, kind: str, metadata: dict, zstd_level: int = DEFAULT_ZSTD_LEVEL):
        self.root = Path(root)
        self.kind = kind
        self.metadata = metadata
        self.zstd_level = zstd_level

    # ---------------------------------------------------------------- opening
    @classmethod
    def create(cls, root: Path, kind: str, metadata: dict, *, zstd_level: int = DEFAULT_ZSTD_LEVEL) -> "ShardSet":
        """Open-or-create for writing; same kind and metadata resume, different ones are refused."""
        root = Path(root)
        metadata = normalise(metadata)
        manifest_path = root / MANIFEST
        if manifest_path.exists():
            old = json.loads(manifest_path.read_text())
            old_view = {"kind": old.get("kind"), **{f"metadata.{k}": v for k, v in old.get("metadata", {}).items()}}
            new_view = {"kind": kind, **{f"metadata.{k}": v for k, v in metadata.items()}}
            if old_view != new_view:
                raise ShardSetMismatchError(_mismatch_message(root, old_view, new_view))
        root.mkdir(parents=True, exist_ok=True)
        shard_set = cls(root, kind, metadata, zstd_level)
        shard_set._remove_stale_tmp_files()
        if not manifest_path.exists():
            shard_set._write_manifest(complete=False, expected_shards=None)
        return shard_set

    @classmethod
    def open(cls, root: Path) -> "ShardSet":
        """Open for reading; ShardSetNotFoundError when root holds no manifest or no complete shard."""
        root = Path(root)
        manifest_path = root / MANIFEST
        if not manifest_path.exists():
            what = "does not exist" if not root.exists() else f"has no {MANIFEST}"
            raise ShardSetNotFoundError(f"{root} {what}: not a lopd shard set. Check the path, or run the stage that writes it.")
        manifest = json.loads(manifest_path.read_text())
        shard_set = cls(root, manifest["kind"], manifest["metadata"])
        if not shard_set.complete_indices():
            raise ShardSetNotFoundError(f"{root} holds no complete shard (no shard-*.json sidecar): run the stage that writes it.")
        return shard_set

    def _remove_stale_tmp_files(self) -> None:
        # Only files of dead writers: a live writer on this host may be mid-shard in the same directory.
        for path in self.root.iterdir():
            match = _TMP_RE.search(path.name)
            if match and not _pid_alive(int(match.group(1))):
                path.unlink(missing_ok=True)

    # ---------------------------------------------------------------- state
    def shard_path(self, index: int) -> Path:
        return self.root / shard_name(index)

    def sidecar_path(self, index: int) -> Path:
        return self.root / sidecar_name(index)

    def is_complete(self, index: int) -> bool:
        return self.sidecar_path(index).exists()

    def complete_indices(self) -> list[int]:
        found = (_SHARD_RE.match(p.name) for p in self.root.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def sidecar(self, index: int) -> dict:
        return json.loads(self.sidecar_path(index).read_text())

    @property
    def manifest(self) -> dict:
        return json.loads((self.root / MANIFEST).read_text())

    # ---------------------------------------------------------------- writing
    def _kv_metadata(self) -> dict[bytes, bytes]:
        return {
            KV_KIND: self.kind.encode(),
            KV_METADATA: json.dumps(self.metadata, sort_keys=True).encode(),
            KV_FORMAT: str(FORMAT_VERSION).encode(),
        }

    def write_shard(self, index: int, table: pa.Table, row_group_size: int | None = None) -> dict:
        """Write shard `index` atomically (tmp file, fsync, rename), then its sidecar, then the manifest."""
        path = self.shard_path(index)
        self.sidecar_path(index).unlink(missing_ok=True)  # the sidecar must never describe other bytes
        schema = table.schema.with_metadata({**(table.schema.metadata or {}), **self._kv_metadata()})
        table = table.replace_schema_metadata(schema.metadata)
        rows_per_group = row_group_size or _default_row_group_size(table)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            with pq.ParquetWriter(
                f,
                schema,
                compression="zstd",
                compression_level=self.zstd_level,
                use_dictionary=[field.name for field in schema if pa.types.is_string(field.type)],
                use_byte_stream_split=_float_leaf_paths(schema) or False,
                write_statistics=[field.name for field in schema if pa.types.is_integer(field.type)],
            ) as writer:
                writer.write_table(table, row_group_size=rows_per_group)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.root)
        info = self._shard_info(index, table)
        _atomic_write_json(self.sidecar_path(index), info)
        _fsync_dir(self.root)
        self._write_manifest(complete=False, expected_shards=self._stored_expected())
        return info

    def _shard_info(self, index: int, table: pa.Table) -> dict:
        path = self.shard_path(index)
        info: dict[str, Any] = {
            "name": path.name,
            "index": index,
            "rows": table.num_rows,
            "row_groups": pq.ParquetFile(path).metadata.num_row_groups,
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if "token_ids" in table.column_names:
            info["tokens"] = int(pc.sum(pc.list_value_length(table["token_ids"])).as_py() or 0)
        if "num_response_tokens" in table.column_names:
            info["response_tokens"] = int(pc.sum(table["num_response_tokens"]).as_py() or 0)
        return info

    def _stored_expected(self) -> int | None:
        path = self.root / MANIFEST
        return json.loads(path.read_text()).get("expected_shards") if path.exists() else None

    def _write_manifest(self, complete: bool, expected_shards: int | None) -> dict:
        shards = [self.sidecar(i) for i in self.complete_indices()]
        totals = {"shards": len(shards)}
        for key in ("rows", "bytes", "tokens", "response_tokens"):
            if shards and all(key in s for s in shards):
                totals[key] = sum(s[key] for s in shards)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "metadata": self.metadata,
            "shards": shards,
            "totals": totals,
            "expected_shards": expected_shards,
            "complete": complete,
        }
        _atomic_write_json(self.root / MANIFEST, manifest)
        return manifest

    def finalize(self, expected_shards: int | None = None) -> dict:
        """Rebuild manifest.json from the sidecars; complete=True iff shards 0..expected-1 are all present.

        With expected_shards=None the caller asserts it has written everything: complete iff the
        indices present are 0..n-1 with no gap.
        """
        indices = self.complete_indices()
        expected = expected_shards if expected_shards is not None else (max(indices) + 1 if indices else 0)
        complete = expected > 0 and set(range(expected)) <= set(indices)
        return self._write_manifest(complete=complete, expected_shards=expected)

    # ---------------------------------------------------------------- reading
    def verify_shard(self, index: int) -> None:
        """Raise CorruptShardError when the file's size or sha256 differ from the sidecar."""
        path, info = self.shard_path(index), self.sidecar(index)
        if not path.exists():
            raise CorruptShardError(corrupt_shard_message(path, "the file is missing although its sidecar exists"))
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CorruptShardError(corrupt_shard_message(path, f"{size} bytes on disk, {info['bytes']} recorded (truncated or overwritten)"))
        if file_sha256(path) != info["sha256"]:
            raise CorruptShardError(corrupt_shard_message(path, "sha256 differs from the sidecar (the bytes were modified)"))

    def parquet_file(self, index: int, verify: bool = True) -> pq.ParquetFile:
        if verify:
            self.verify_shard(index)
        path = self.shard_path(index)
        try:
            return pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            raise CorruptShardError(corrupt_shard_message(path, f"unreadable Parquet ({err})")) from err

    def read_shard(self, index: int, verify: bool = True, columns: list[str] | None = None) -> pa.Table:
        return self.parquet_file(index, verify).read(columns=columns)

    def iter_row_groups(self, index: int, verify: bool = True, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Yield the shard's row groups one at a time (bounded memory)."""
        pf = self.parquet_file(index, verify)
        for group in range(pf.metadata.num_row_groups):
            yield pf.read_row_group(group, columns=columns)

    def row_group_sizes(self, index: int) -> list[int]:
        """Rows per row group, from the Parquet footer (no data read)."""
        meta = pq.ParquetFile(self.shard_path(index)).metadata
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


def corrupt_shard_message(path: Path, what: str) -> str:
    sidecar = path.with_suffix(".json")
    return (
        f"corrupt shard {path}: {what}. Delete {path.name} and {sidecar.name} and rerun the stage that wrote "
        f"{path.parent}: it redoes only the missing shard."
    )


def _default_row_group_size(table: pa.Table) -> int:
    if table.num_rows == 0:
        return 1
    bytes_per_row = max(1, table.nbytes // table.num_rows)
    return max(1, min(table.num_rows, TARGET_ROW_GROUP_BYTES // bytes_per_row))


class WriteBehind:
    """Encodes and writes shards on one background thread while the caller computes the next one.

    ``submit(index, make_table)`` queues ``shard_set.write_shard(index, make_table())``; at most
    ``max_pending`` shards wait (bounded memory), and a writer error is raised by the next ``submit`` or on
    leaving the ``with`` block. Leaving the block, even on an error, first waits for the queued shards, so
    every shard handed over before a failure is durable; each write is atomic as in ``write_shard``.
    """

    def __init__(self, shard_set: ShardSet, max_pending: int = 1):
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending} must be >= 1")
        self.shard_set = shard_set
        self.max_pending = max_pending
        self.written: list[dict] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lopd-shard-writer")
        self._pending: deque[Future] = deque()

    def submit(self, index: int, make_table: Callable[[], pa.Table]) -> None:
        while len(self._pending) >= self.max_pending:
            self.written.append(self._pending.popleft().result())
        self._pending.append(self._pool.submit(lambda: self.shard_set.write_shard(index, make_table())))

    def drain(self) -> list[dict]:
        """Wait for every queued shard; the sidecar info of all shards written so far."""
        while self._pending:
            self.written.append(self._pending.popleft().result())
        return self.written

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.drain()
            else:  # keep what was handed over; the body's error is the one to report
                for future in self._pending:
                    future.exception()
        finally:
            self._pool.shutdown(wait=True)
