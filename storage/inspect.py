"""`lopd shards inspect` / `lopd shards verify` / `lopd shards export --readable`: what a shard set holds, whether it
is intact, and its rows as plain Parquet.

The readable form of a shard is one row per rollout with plain Arrow columns that polars, duckdb, pandas and HF
datasets read without lopd: ``prompt_id``, ``sample_index``, ``prompt_len``, ``token_ids`` (list<int32>, prompt +
response), ``reward``, and for teacher top-k shards ``teacher_logprobs`` / ``behavior_logprobs`` / ``tail_logprob``
(list<float32>, one per response token), ``topk_ids`` (list<list<int32>>) and ``topk_logprobs``
(list<list<float32>>, descending, one list of k per response token). Samples shards are plain already and are
copied column for column. Token text is a model's business: the caller may add columns (``decorate``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.codecs import KV_CODEC, decode_table
from storage.errors import LopdUserError
from storage.records import TeacherRecord
from storage.shardset import ShardSet, _atomic_write_bytes, find_problems, shard_name


def inspect_shards(path: Path | str) -> dict:
    """A JSON-able summary: kind, metadata, fingerprints, codec, rows, tokens, bytes/token, schema, per-column bytes."""
    shard_set = ShardSet.open(Path(path))
    shard_set.require_intact(finished=False)  # an unfinished set can be inspected, a damaged one cannot
    manifest = shard_set.manifest
    sidecars = [shard_set.sidecar(i) for i in shard_set.complete_indices()]
    first = pq.ParquetFile(shard_set.shard_path(shard_set.complete_indices()[0]))
    kv = first.schema_arrow.metadata or {}
    codec = json.loads(kv[KV_CODEC]) if KV_CODEC in kv else {}
    rows = sum(s["rows"] for s in sidecars)
    size = sum(s["bytes"] for s in sidecars)
    tokens = sum(s.get("tokens", 0) for s in sidecars)
    response_tokens = sum(s.get("response_tokens", 0) for s in sidecars)
    per_token = response_tokens or tokens
    return {
        "path": str(shard_set.root),
        "kind": shard_set.kind,
        "complete": bool(manifest.get("complete")),
        "expected_shards": manifest.get("expected_shards"),
        "shards": len(sidecars),
        "rows": rows,
        "tokens": tokens,
        "response_tokens": response_tokens,
        "bytes": size,
        "bytes_per_token": size / per_token if per_token else None,
        "bytes_per_token_basis": "response_tokens" if response_tokens else "tokens",
        "codec": codec.get("codec"),
        "k": codec.get("k"),
        "vocab_size": codec.get("vocab_size"),
        "codec_params": codec.get("params"),
        "fingerprints": {k: v for k, v in shard_set.metadata.items() if "fingerprint" in k},
        "metadata": shard_set.metadata,
        "schema": [f"{field.name}: {field.type}" for field in first.schema_arrow],
        "column_bytes_per_token": _column_bytes(shard_set, per_token),
    }


def _column_bytes(shard_set: ShardSet, per_token: int) -> dict[str, float]:
    """Compressed bytes per token of each top-level column, from the Parquet footers."""
    totals: dict[str, int] = {}
    for index in shard_set.complete_indices():
        meta = pq.ParquetFile(shard_set.shard_path(index)).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                column = meta.row_group(g).column(c)
                name = column.path_in_schema.split(".")[0]
                totals[name] = totals.get(name, 0) + column.total_compressed_size
    return {name: round(b / per_token, 3) for name, b in totals.items()} if per_token else {}


def verify_shards(path: Path | str) -> list[str]:
    """Problems found, one line each naming the file and the fix (empty list = intact): checksums, truncation,
    missing or damaged sidecars, a damaged manifest, metadata consistency, completeness. Never raises on a
    damaged set; see ShardSet.problems."""
    return find_problems(Path(path), checksums=True)


def _offsets(lengths: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.array(offsets)


def _lists(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """One list per array (1-D: list<value>; 2-D [R, K]: list<list<value>>, R lists of K), built from the flat
    values without a Python loop over the elements."""
    outer = _offsets(np.array([a.shape[0] for a in arrays], dtype=np.int64))
    if pa.types.is_list(value_type):
        rows = np.concatenate(arrays) if arrays else np.zeros((0, 0))
        flat = pa.array(rows.reshape(-1), type=value_type.value_type)
        inner = pa.ListArray.from_arrays(_offsets(np.full(rows.shape[0], rows.shape[1], dtype=np.int64)), flat)
        return pa.ListArray.from_arrays(outer, inner)
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(outer, pa.array(flat, type=value_type))


def records_table(records: list[TeacherRecord]) -> pa.Table:
    """Teacher records as the readable table (module docstring)."""
    return pa.table({
        "prompt_id": pa.array([r.prompt_id for r in records], pa.string()),
        "sample_index": pa.array([r.sample_index for r in records], pa.int32()),
        "prompt_len": pa.array([r.prompt_len for r in records], pa.int32()),
        "token_ids": _lists([r.token_ids for r in records], pa.int32()),
        "teacher_logprobs": _lists([r.teacher_logprobs for r in records], pa.float32()),
        "behavior_logprobs": _lists([r.behavior_logprobs for r in records], pa.float32()),
        "topk_ids": _lists([r.topk_ids for r in records], pa.list_(pa.int32())),
        "topk_logprobs": _lists([r.topk_logprobs for r in records], pa.list_(pa.float32())),
        "tail_logprob": _lists([r.tail_logprob for r in records], pa.float32()),
        "reward": pa.array([r.reward for r in records], pa.float32()),
    })


def readable_shard(shard_set: ShardSet, index: int) -> pa.Table:
    """Shard ``index`` of ``shard_set`` as the readable table, without lopd's schema metadata."""
    table = shard_set.read_shard(index)
    if shard_set.kind == "teacher_topk":
        table = records_table(decode_table(table))
    return table.replace_schema_metadata(None)


def iter_readable(path: Path | str, rows: int | None = None) -> Iterator[pa.Table]:
    """The readable tables of a finished or unfinished (not damaged) shard set, shard by shard; at most ``rows``
    rows in all."""
    shard_set = ShardSet.open(Path(path))
    shard_set.require_intact(finished=False)
    left = rows
    for index in shard_set.complete_indices():
        if left is not None and left <= 0:
            return
        table = readable_shard(shard_set, index)
        if left is not None:
            table = table.slice(0, left)
            left -= table.num_rows
        yield table


def export_readable(src: Path | str, out: Path | str,
                    decorate: Callable[[pa.Table], pa.Table] | None = None) -> dict:
    """Write every complete shard of ``src`` as plain Parquet ``out/shard-NNNNN.parquet`` (zstd; ``decorate`` may add
    columns, e.g. token text). Refuses an ``out`` that is a shard set, so a shard set is never overwritten."""
    src, out = Path(src), Path(out)
    if (out / "manifest.json").exists() or out.resolve() == src.resolve():
        raise LopdUserError(f"--readable {out}: is a shard set; export to a new directory")
    shard_set = ShardSet.open(src)
    shard_set.require_intact(finished=False)
    out.mkdir(parents=True, exist_ok=True)
    files, rows = [], 0
    for index in shard_set.complete_indices():
        table = readable_shard(shard_set, index)
        if decorate is not None:
            table = decorate(table)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        _atomic_write_bytes(out / shard_name(index), sink.getvalue().to_pybytes())
        files.append(str(out / shard_name(index)))
        rows += table.num_rows
    return {"source": str(src), "kind": shard_set.kind, "out": str(out), "files": files, "rows": rows,
            "columns": [f"{f.name}: {f.type}" for f in pq.read_schema(files[0])] if files else []}
