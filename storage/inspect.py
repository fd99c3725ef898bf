"""`lopd shards inspect` / `lopd shards verify`: what a shard set holds, and whether it is intact."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from storage.codecs import KV_CODEC
from storage.shardset import ShardSet, find_problems


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
