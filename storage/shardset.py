"""A directory of Parquet shards written atomically, with one sidecar per complete shard.

Layout of a shard set directory::

    shard-00000.parquet   the data (zstd; dataset metadata also in the Parquet key-value metadata)
    shard-00000.json      sidecar: rows, tokens, bytes, sha256 of the file bytes; written last
    manifest.json         kind, metadata, shard list, totals, complete flag (a summary)

The sidecars are the truth: a shard is complete iff its sidecar exists, so a writer killed at any
moment leaves at worst a shard without a sidecar (redone on resume) and `*.tmp-<pid>-<thread>` files
(removed by the next `create()`). A shard produced piece by piece streams into its temp file
(`shard_writer`, `WriteBehind.submit(..., last=False)`) under the same protocol. manifest.json is rebuilt
from all sidecars after each shard and by `finalize()`, so writers of different shards of one directory
(e.g. parallel Prefect workers) do not lose each other's shards.

Reading refuses a damaged or unfinished set up front (``require_complete``): every file is parsed and
checked against the others (sidecars against the manifest and the Parquet footers, the manifest's shard
list, totals and completeness), and each problem names the file and the fix. ``problems()`` is that
check plus the checksums; ``lopd shards verify`` prints it.

Resume identity is the metadata minus its ``provenance`` sub-dict: fingerprints and settings say what the
content is; ``provenance`` (input paths) only says where it came from, so a run directory that moved, or a
rerun from another working directory, resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.errors import LopdUserError, MissingInputError

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
_PARQUET_RE = re.compile(r"^shard-(\d{5,})\.parquet$")
_TMP_RE = re.compile(r"\.tmp-(\d+)(?:-\d+)?$")  # <name>.tmp-<pid>-<thread id> (before: <name>.tmp-<pid>)
PROVENANCE = "provenance"  # metadata key whose value is provenance only (paths): not part of resume identity
_MANIFEST_FIELDS: dict[str, tuple[type, ...]] = {
    "format_version": (int,), "kind": (str,), "metadata": (dict,), "shards": (list,), "totals": (dict,),
    "expected_shards": (int, type(None)), "complete": (bool,),
}
_SIDECAR_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,), "index": (int,), "rows": (int,), "row_groups": (int,), "bytes": (int,), "sha256": (str,),
    "created": (str,),
}
_SIDECAR_OPTIONAL = {"tokens": (int,), "response_tokens": (int,)}


class ShardSetError(LopdUserError):
    """Base class of shard set errors; the message names the file and the fix."""


class ShardSetNotFoundError(ShardSetError, MissingInputError):
    """The directory holds no shard set (no manifest.json / no complete shard)."""


class ShardSetMismatchError(ShardSetError):
    """create() found an existing shard set whose kind or metadata differ from the requested ones."""


class CorruptShardError(ShardSetError):
    """A file of the shard set is damaged: a shard's bytes differ from its sidecar (truncated, modified,
    unreadable), or a sidecar, the manifest or a Parquet footer cannot be parsed or contradicts the others."""


class IncompleteShardSetError(ShardSetError):
    """The shard set is unfinished: the manifest is not marked complete, or a shard it lists or expects has
    no sidecar (the writing stage did not finish it)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def sidecar_name(index: int) -> str:
    return f"shard-{index:05d}.json"


def normalise(value: Any) -> Any:
    """JSON round trip: what compares equal after being written and read back."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except TypeError as err:
        raise ValueError("shard set metadata must be JSON-serialisable (convert paths and numpy values first): "
                         f"{err}") from err


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


def _tmp_path(path: Path) -> Path:
    # One per writing thread: threads of one process (a thread-pool task runner's parts) write the same
    # manifest, and a shared temp name would be renamed away under another writer.
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = _tmp_path(path)
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


def identity(metadata: dict) -> dict:
    """The part of the metadata that says what the content is (everything but ``provenance``)."""
    return {k: v for k, v in metadata.items() if k != PROVENANCE}


def _has_types(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:  # a bool is an int to isinstance
        return False
    return isinstance(value, types)


def _read_json_object(path: Path, what: str, fields: dict[str, tuple[type, ...]], optional: dict[str, tuple[type, ...]],
                      fix: str) -> dict:
    """Parse one of the set's JSON files; any damage (bytes, syntax, fields, types) is a CorruptShardError."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptShardError(f"{path}: unreadable {what} ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise CorruptShardError(f"{path}: {what} is not a JSON object; {fix}")
    missing = sorted(set(fields) - set(data))
    unknown = sorted(set(data) - set(fields) - set(optional))
    wrong = sorted(k for k, v in data.items() if k in fields or k in optional
                   if not _has_types(v, {**fields, **optional}[k]))
    if missing or unknown or wrong:
        detail = "; ".join(f"{label} {keys}" for label, keys in
                           (("missing", missing), ("unknown", unknown), ("wrong type of", wrong)) if keys)
        raise CorruptShardError(f"{path}: damaged {what} ({detail}); {fix}")
    return data


def read_manifest(root: Path) -> dict:
    """manifest.json, parsed and checked field by field (ShardSetNotFoundError / CorruptShardError)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        if not root.is_dir():
            what = "is not a directory" if root.exists() else "does not exist"
            raise ShardSetNotFoundError(f"{root} {what}: not a lopd shard set. Check the path, or run the stage that "
                                        "writes it.")
        if any(_SHARD_RE.match(p.name) for p in root.iterdir()):
            raise ShardSetNotFoundError(f"{path} is missing: rerun the stage that wrote {root}; it rebuilds the "
                                        "manifest from the sidecars and redoes nothing else")
        raise ShardSetNotFoundError(f"{root} has no {MANIFEST}: not a lopd shard set. Check the path, or run the stage "
                                    "that writes it.")
    fix = f"delete {MANIFEST} and rerun the stage that wrote {root}: it rebuilds the manifest from the sidecars"
    return _read_json_object(path, "manifest", _MANIFEST_FIELDS, {}, fix)


def read_sidecar(root: Path, index: int) -> dict:
    """shard-NNNNN.json, parsed and checked field by field (CorruptShardError)."""
    path = Path(root) / sidecar_name(index)
    fix = (f"delete {shard_name(index)} and {path.name} and rerun the stage that wrote {path.parent}: it redoes only "
           "that shard")
    info = _read_json_object(path, "sidecar", _SIDECAR_FIELDS, _SIDECAR_OPTIONAL, fix)
    if info["index"] != index or info["name"] != shard_name(index):
        raise CorruptShardError(f"{path}: damaged sidecar (it names shard {info['index']} / {info['name']!r}); {fix}")
    return info


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
        """Open-or-create for writing; same kind and metadata resume, different ones are refused.

        Metadata compare without ``metadata["provenance"]`` (see ``identity``); a resumed set keeps the
        metadata it was created with, so every shard carries the same."""
        root = Path(root)
        metadata = normalise(metadata)
        manifest_path = root / MANIFEST
        existing = _existing_kind_and_metadata(root)
        if existing is not None:
            old_kind, old_metadata = existing
            old_view = {"kind": old_kind, **{f"metadata.{k}": v for k, v in identity(old_metadata).items()}}
            new_view = {"kind": kind, **{f"metadata.{k}": v for k, v in identity(metadata).items()}}
            if old_view != new_view:
                raise ShardSetMismatchError(_mismatch_message(root, old_view, new_view))
            metadata = old_metadata
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
        manifest = read_manifest(root)
        shard_set = cls(root, manifest["kind"], manifest["metadata"])
        if not shard_set.complete_indices():
            raise ShardSetNotFoundError(f"{root} holds no complete shard (no shard-*.json sidecar): run the stage "
                                        "that writes it.")
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
        return read_sidecar(self.root, index)

    @property
    def manifest(self) -> dict:
        return read_manifest(self.root)

    def problems(self, checksums: bool = True) -> list[str]:
        """Everything wrong with the set on disk, one line each naming the file and the fix (empty = intact)."""
        return find_problems(self.root, checksums)

    def require_intact(self, finished: bool = True) -> None:
        """Raise unless every file parses and agrees with the others and, with ``finished``, the manifest is
        complete with every expected shard present: CorruptShardError / IncompleteShardSetError naming the
        first problem and its fix. Checksums are left to the reads, which verify a shard before decoding it."""
        found = [(error, message) for error, message in _problems(self.root, checksums=False)
                 if finished or error is CorruptShardError]
        if found:
            error, message = found[0]
            more = (f" ({len(found) - 1} more problem(s): `lopd shards verify {self.root}` lists them)"
                    if len(found) > 1 else "")
            raise error(message + more)

    # ---------------------------------------------------------------- writing
    def _kv_metadata(self) -> dict[bytes, bytes]:
        return {
            KV_KIND: self.kind.encode(),
            KV_METADATA: json.dumps(self.metadata, sort_keys=True).encode(),
            KV_FORMAT: str(FORMAT_VERSION).encode(),
        }

    def write_shard(self, index: int, table: pa.Table, row_group_size: int | None = None) -> dict:
        """Write shard `index` atomically (tmp file, fsync, rename), then its sidecar, then the manifest: the
        one-table case of ``shard_writer``."""
        with self.shard_writer(index, row_group_size) as shard:
            shard.write(table)
        return shard.info

    def shard_writer(self, index: int, row_group_size: int | None = None) -> "ShardWriter":
        """A writer of shard `index` as a sequence of tables (see ``ShardWriter``): bounded memory for a shard
        produced piece by piece, the same bytes as ``write_shard`` of the pieces' concatenation."""
        return ShardWriter(self, index, row_group_size)

    def _stored_expected(self) -> int | None:
        return read_manifest(self.root)["expected_shards"] if (self.root / MANIFEST).exists() else None

    def _write_manifest(self, complete: bool, expected_shards: int | None) -> dict:
        shards = [self.sidecar(i) for i in self.complete_indices()]
        totals = _totals(shards)
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
            raise CorruptShardError(corrupt_shard_message(
                path, f"{size} bytes on disk, {info['bytes']} recorded (truncated or overwritten)"))
        if file_sha256(path) != info["sha256"]:
            raise CorruptShardError(corrupt_shard_message(
                path, "sha256 differs from the sidecar (the bytes were modified)"))

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


def _existing_kind_and_metadata(root: Path) -> tuple[str, dict] | None:
    """What an existing set at root was created with: from the manifest, or, when the manifest was deleted,
    from the Parquet footer of a complete shard. None for a new set."""
    if (root / MANIFEST).exists():
        manifest = read_manifest(root)
        return manifest["kind"], manifest["metadata"]
    indices = (sorted(int(m.group(1)) for m in (_SHARD_RE.match(p.name) for p in root.iterdir()) if m)
               if root.is_dir() else [])
    if not indices:
        return None
    kv = _footer_kv(root / shard_name(indices[0]))
    return kv[KV_KIND].decode(), json.loads(kv[KV_METADATA])


def _footer_kv(path: Path) -> dict[bytes, bytes]:
    """The lopd key-value metadata of a Parquet shard; CorruptShardError when unreadable or incomplete."""
    try:
        kv = pq.read_schema(path).metadata or {}
        if any(key not in kv for key in (KV_KIND, KV_METADATA, KV_FORMAT)):
            raise ValueError("no lopd.kind / lopd.metadata / lopd.format_version key-value metadata")
        kv[KV_KIND].decode()
        if not isinstance(json.loads(kv[KV_METADATA]), dict):
            raise ValueError("lopd.metadata is not a JSON object")
        return kv
    except Exception as err:  # pyarrow raises several types for a bad footer
        raise CorruptShardError(corrupt_shard_message(path, f"unreadable Parquet footer ({err})")) from None


def find_problems(root: Path | str, checksums: bool = True) -> list[str]:
    """Everything wrong with the shard set at root, one line each naming the file and the fix (empty =
    intact); never raises on a damaged set. ``lopd shards verify`` prints it."""
    return [message for _, message in _problems(Path(root), checksums)]


def _problems(root: Path, checksums: bool) -> list[tuple[type[ShardSetError], str]]:
    """(error type, message) for every problem of the set at root; see ShardSet.problems."""
    try:
        manifest = read_manifest(root)
    except ShardSetError as err:
        return [(type(err), str(err))]
    found: list[tuple[type[ShardSetError], str]] = []
    sidecars: dict[int, dict] = {}
    names = sorted(p.name for p in root.iterdir())
    for name in names:
        if m := _SHARD_RE.match(name):
            try:
                sidecars[int(m.group(1))] = read_sidecar(root, int(m.group(1)))
            except ShardSetError as err:
                found.append((CorruptShardError, str(err)))
    damaged = {int(m.group(1)) for m in map(_SHARD_RE.match, names) if m} - set(sidecars)
    for name in names:
        m = _PARQUET_RE.match(name)
        if m and int(m.group(1)) not in sidecars and int(m.group(1)) not in damaged:
            found.append((IncompleteShardSetError, f"{root / name}: no sidecar {sidecar_name(int(m.group(1)))}, so the "
                          "shard is incomplete; rerun the stage that wrote it to redo it"))
    for index, info in sorted(sidecars.items()):
        found += [(CorruptShardError, p) for p in _shard_problems(root, index, info, manifest, checksums)]
    return _manifest_problems(root, manifest, sidecars, damaged) + found


def _shard_problems(root: Path, index: int, info: dict, manifest: dict, checksums: bool) -> list[str]:
    path = root / shard_name(index)
    fix = f"delete {path.name} and {sidecar_name(index)} and rerun the stage that wrote {root}"
    if not path.exists():
        return [f"{path}: missing although its sidecar exists; {fix}"]
    size = path.stat().st_size
    if size != info["bytes"]:
        return [f"{path}: {size} bytes on disk, {info['bytes']} in the sidecar (truncated or overwritten); {fix}"]
    if checksums and file_sha256(path) != info["sha256"]:
        return [f"{path}: sha256 differs from the sidecar (bytes modified); {fix}"]
    try:
        kv = _footer_kv(path)
        meta = pq.read_metadata(path)
    except CorruptShardError as err:
        return [str(err)]
    except Exception as err:  # pyarrow raises several types for a bad footer
        return [corrupt_shard_message(path, f"unreadable Parquet footer ({err})")]
    problems = []
    if (meta.num_rows, meta.num_row_groups) != (info["rows"], info["row_groups"]):
        problems.append(f"{path}: {meta.num_rows} rows in {meta.num_row_groups} row groups, the sidecar says "
                        f"{info['rows']} in {info['row_groups']}; {fix}")
    if kv[KV_KIND].decode(errors="replace") != manifest["kind"]:
        problems.append(f"{path}: Parquet metadata kind {kv[KV_KIND].decode(errors='replace')!r} differs from the "
                        f"manifest's {manifest['kind']!r}; {fix}")
    shard_meta = json.loads(kv[KV_METADATA])
    if shard_meta != manifest["metadata"]:
        keys = sorted(k for k in set(shard_meta) | set(manifest["metadata"])
                      if shard_meta.get(k) != manifest["metadata"].get(k))
        problems.append(f"{path}: Parquet metadata differs from the manifest in {', '.join(keys)} (fingerprints must "
                        f"match across shards); {fix}")
    if kv[KV_FORMAT] != str(FORMAT_VERSION).encode():
        problems.append(f"{path}: lopd.format_version {kv[KV_FORMAT]!r} in the Parquet metadata, this lopd reads "
                        f"{FORMAT_VERSION}; {fix}")
    return problems


def _manifest_problems(root: Path, manifest: dict, sidecars: dict[int, dict],
                       damaged: set[int]) -> list[tuple[type[ShardSetError], str]]:
    path = root / MANIFEST
    rebuild = f"rerun the stage that wrote {root} (it rebuilds the manifest from the sidecars)"
    found: list[tuple[type[ShardSetError], str]] = []
    present = set(sidecars) | damaged
    expected = manifest["expected_shards"]
    missing: list[int] = []
    if not manifest["complete"]:
        found.append((IncompleteShardSetError, f"{root}: the manifest is not marked complete (the writing stage did "
                      "not finish); rerun the stage that wrote it to finish it"))
    elif expected is None or expected < 1:
        found.append((CorruptShardError, f"{path}: marked complete with expected_shards {expected}; {rebuild}"))
    else:
        missing = sorted(set(range(expected)) - present)
        extra = sorted(present - set(range(expected)))
        if missing:
            found.append((IncompleteShardSetError, f"{root}: {len(missing)} of {expected} expected shards missing "
                          f"(first: {shard_name(missing[0])}, no sidecar {sidecar_name(missing[0])}); rerun the "
                          "stage that wrote it to finish it"))
        if extra:
            found.append((CorruptShardError, f"{root}: shards {extra} lie beyond the {expected} the manifest expects; "
                          f"{rebuild}"))
    if manifest["format_version"] != FORMAT_VERSION:
        found.append((CorruptShardError, f"{path}: format_version {manifest['format_version']}, this lopd reads "
                      f"{FORMAT_VERSION}; {rebuild}"))
    if not present:
        found.append((ShardSetNotFoundError, f"{root} holds no complete shard (no shard-*.json sidecar): run the "
                      "stage that writes it"))
    listed = {s.get("index"): s for s in manifest["shards"] if isinstance(s, dict)}
    unexplained = set(listed) - present - set(missing)
    if len(listed) != len(manifest["shards"]) or unexplained or present - set(listed):
        found.append((IncompleteShardSetError if unexplained else CorruptShardError,
                      f"{path}: lists shards {sorted(listed, key=str)}, the sidecars say {sorted(present)}; a listed "
                      f"shard without its sidecar is incomplete: {rebuild}; it redoes the missing shards"))
    elif not set(listed) - present:
        differ = sorted(i for i in sidecars if listed[i] != sidecars[i])
        if differ:
            found.append((CorruptShardError, f"{path}: its entry for shard {differ[0]} differs from "
                          f"{sidecar_name(differ[0])} (one of the two was modified); {rebuild}"))
        if not damaged and manifest["totals"] != _totals(list(sidecars.values())):
            found.append((CorruptShardError, f"{path}: totals {manifest['totals']} differ from the sidecars' "
                          f"{_totals(list(sidecars.values()))}; {rebuild}"))
    return found


def _totals(shards: list[dict]) -> dict[str, int]:
    totals = {"shards": len(shards)}
    for key in ("rows", "bytes", "tokens", "response_tokens"):
        if shards and all(key in s for s in shards):
            totals[key] = sum(s[key] for s in shards)
    return totals


def corrupt_shard_message(path: Path, what: str) -> str:
    sidecar = path.with_suffix(".json")
    return (
        f"corrupt shard {path}: {what}. Delete {path.name} and {sidecar.name} and rerun the stage that wrote "
        f"{path.parent}: it redoes only the missing shard."
    )


class ShardWriter:
    """Shard `index` of a set, written as a sequence of tables appended to its temp file as they arrive.

    Same atomic protocol as ``write_shard`` (which is the one-table case): the old sidecar is removed first;
    ``close()`` fsyncs and renames the temp file, then writes the sidecar and the manifest. A writer that
    fails or is abandoned before ``close()`` leaves no shard and no sidecar: ``abort()`` (or leaving the
    ``with`` block on an error) removes the temp file, and one of a killed process is removed by the next
    ``ShardSet.create``.

    Rows are written in row groups of ``row_group_size`` rows (default: ``TARGET_ROW_GROUP_BYTES`` over the
    bytes per row of the first table with rows), whatever the tables' boundaries: the rows of a group that
    spans tables wait in memory (at most one group), so the file has the same bytes as ``write_shard`` of
    the tables' concatenation whenever the first table gives the same group size (always with an explicit
    ``row_group_size``, and for shards of one group). Every table needs the first table's schema.
    """

    def __init__(self, shard_set: ShardSet, index: int, row_group_size: int | None = None):
        self.shard_set = shard_set
        self.index = index
        self.info: dict = {}
        self._rows_per_group = row_group_size
        self._path = shard_set.shard_path(index)
        self._tmp = _tmp_path(self._path)
        self._file: Any = None
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._waiting: list[pa.Table] = []  # rows of the next row group, fewer than _rows_per_group
        self._counts = {"rows": 0, "tokens": 0, "response_tokens": 0}
        shard_set.sidecar_path(index).unlink(missing_ok=True)  # the sidecar must never describe other bytes

    def write(self, table: pa.Table) -> None:
        """Append the table's rows to the shard (full row groups go to the file now)."""
        if self._writer is None:
            self._open(table.schema)
        elif not table.schema.equals(self._schema, check_metadata=False):
            raise ValueError(f"{self._path.name}: a table with schema {table.schema} does not match the shard's "
                             f"{self._schema}")
        self._counts["rows"] += table.num_rows
        if "token_ids" in table.column_names:
            self._counts["tokens"] += int(pc.sum(pc.list_value_length(table["token_ids"])).as_py() or 0)
        if "num_response_tokens" in table.column_names:
            self._counts["response_tokens"] += int(pc.sum(table["num_response_tokens"]).as_py() or 0)
        if table.num_rows == 0:
            return
        if self._rows_per_group is None:
            self._rows_per_group = max(1, TARGET_ROW_GROUP_BYTES // max(1, table.nbytes // table.num_rows))
        self._waiting.append(table)
        waiting = sum(t.num_rows for t in self._waiting)
        if waiting < self._rows_per_group:
            return
        rows = pa.concat_tables(self._waiting)
        full = waiting - waiting % self._rows_per_group
        # one contiguous table per group: the file's bytes do not depend on where the tables were cut
        for start in range(0, full, self._rows_per_group):
            self._write_group(rows.slice(start, self._rows_per_group).combine_chunks())
        self._waiting = [rows.slice(full)] if full < waiting else []

    def close(self) -> dict:
        """Finish the shard: last row group, fsync, rename, sidecar, manifest; returns the sidecar info."""
        if self._writer is None:
            raise ValueError(f"{self._path.name}: no table was written; a shard needs at least one (it may be empty)")
        try:
            if self._waiting:
                self._write_group(pa.concat_tables(self._waiting).combine_chunks())
            elif self._counts["rows"] == 0:  # an empty shard still has its schema and one empty row group
                self._writer.write_table(self._schema.empty_table(), row_group_size=1)
            self._writer.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self._path)
        except BaseException:
            self.abort()
            raise
        root = self.shard_set.root
        _fsync_dir(root)
        self.info = self._shard_info()
        _atomic_write_json(self.shard_set.sidecar_path(self.index), self.info)
        _fsync_dir(root)
        self.shard_set._write_manifest(complete=False, expected_shards=self.shard_set._stored_expected())
        return self.info

    def abort(self) -> None:
        """Drop the unfinished shard: its temp file is removed, nothing else was written."""
        self._waiting = []
        with contextlib.suppress(Exception):  # a writer that failed mid-write may not close cleanly
            if self._writer is not None:
                self._writer.close()
        if self._file is not None:
            self._file.close()
        self._tmp.unlink(missing_ok=True)
        self._writer = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self, schema: pa.Schema) -> None:
        self._schema = schema.with_metadata({**(schema.metadata or {}), **self.shard_set._kv_metadata()})
        self._file = open(self._tmp, "wb")
        self._writer = pq.ParquetWriter(
            self._file,
            self._schema,
            compression="zstd",
            compression_level=self.shard_set.zstd_level,
            use_dictionary=[field.name for field in schema if pa.types.is_string(field.type)],
            use_byte_stream_split=_float_leaf_paths(schema) or False,
            write_statistics=[field.name for field in schema if pa.types.is_integer(field.type)],
        )

    def _write_group(self, group: pa.Table) -> None:
        self._writer.write_table(group, row_group_size=group.num_rows)

    def _shard_info(self) -> dict:
        info: dict[str, Any] = {
            "name": self._path.name,
            "index": self.index,
            "rows": self._counts["rows"],
            "row_groups": pq.ParquetFile(self._path).metadata.num_row_groups,
            "bytes": self._path.stat().st_size,
            "sha256": file_sha256(self._path),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if "token_ids" in self._schema.names:
            info["tokens"] = self._counts["tokens"]
        if "num_response_tokens" in self._schema.names:
            info["response_tokens"] = self._counts["response_tokens"]
        return info


class WriteBehind:
    """Encodes and writes shards on one background thread while the caller computes what comes next.

    ``submit(index, make_table)`` queues ``shard_set.write_shard(index, make_table())``. A shard made piece
    by piece is streamed: ``submit(index, make_piece, last=False)`` for every piece but the last appends it
    to the shard's ``ShardWriter`` on the writer thread, in order, so no piece waits for the others; the
    shard is complete after its ``last=True`` piece. At most ``max_pending`` tables wait (bounded memory),
    and a writer error is raised by the next ``submit`` or on leaving the ``with`` block; after an error the
    writer writes nothing more. Leaving the block, even on an error, first waits for the queued tables, so
    every shard handed over complete before a failure is durable; a shard left unfinished (its last piece
    never came, or a piece failed) leaves no shard file and no sidecar.
    """

    def __init__(self, shard_set: ShardSet, max_pending: int = 1):
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending} must be >= 1")
        self.shard_set = shard_set
        self.max_pending = max_pending
        self.written: list[dict] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lopd-shard-writer")
        self._pending: deque[Future] = deque()
        self._shard: ShardWriter | None = None  # the shard being streamed; touched by the writer thread only
        self._failed = False

    def submit(self, index: int, make_table: Callable[[], pa.Table], *, last: bool = True) -> None:
        """Queue ``make_table()`` as (the next piece of) shard ``index``; ``last`` completes the shard."""
        while len(self._pending) >= self.max_pending:
            self._collect(self._pending.popleft())
        self._pending.append(self._pool.submit(self._write, index, make_table, last))

    def drain(self) -> list[dict]:
        """Wait for every queued table; the sidecar info of all shards written so far."""
        while self._pending:
            self._collect(self._pending.popleft())
        return self.written

    def _collect(self, future: Future) -> None:
        info = future.result()
        if info is not None:
            self.written.append(info)

    def _write(self, index: int, make_table: Callable[[], pa.Table], last: bool) -> dict | None:
        if self._failed:
            raise RuntimeError(f"shard {index} not written: an earlier write of this writer failed")
        try:
            if self._shard is None:
                self._shard = self.shard_set.shard_writer(index)
            elif self._shard.index != index:
                raise ValueError(f"shard {index} started before shard {self._shard.index} got its last piece")
            self._shard.write(make_table())
            if not last:
                return None
            shard, self._shard = self._shard, None
            return shard.close()
        except BaseException:
            self._failed = True
            self._abort()
            raise

    def _abort(self) -> None:
        if self._shard is not None:
            self._shard.abort()
            self._shard = None

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.drain()
                if self._shard is not None:
                    raise ValueError(f"shard {self._shard.index} was left unfinished (no last=True piece)")
            else:  # keep what was handed over; the body's error is the one to report
                for future in self._pending:
                    future.exception()
        finally:
            self._pool.shutdown(wait=True)
            self._abort()  # the writer thread is done: an unfinished shard leaves no temp file
