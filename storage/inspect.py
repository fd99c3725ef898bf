"""`lopd shards inspect` / `lopd shards verify`: what a shard set holds, and whether it is intact."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq

from storage.codecs import KV_CODEC
from storage.shardset import KV_FORMAT, KV_KIND, KV_METADATA, MANIFEST, ShardSet, file_sha256

_PARQUET_RE = re.compile(r"^shard-(\d{5,})\.parquet$")


def inspect_shards(path: Path | str) -> dict:
    """A JSON-able summary: kind, metadata, fingerprints, codec, rows, tokens, bytes/token, schema, per-column bytes."""
    shard_set = ShardSet.open(Path(path))
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
    """Problems found (empty list = OK): checksums, truncation, missing sidecars, metadata consistency."""
    root = Path(path)
    if not (root / MANIFEST).exists():
        return [f"{root}: no {MANIFEST}; not a lopd shard set"]
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except json.JSONDecodeError as err:
        return [f"{root / MANIFEST}: unreadable JSON ({err})"]
    shard_set = ShardSet(root, manifest["kind"], manifest["metadata"])
    complete = shard_set.complete_indices()
    problems = _orphan_problems(root, set(complete))
    for index in complete:
        problems += _shard_problems(shard_set, index, manifest)
    problems += _manifest_problems(root, manifest, shard_set, complete)
    return problems


def _orphan_problems(root: Path, complete: set[int]) -> list[str]:
    problems = []
    for p in sorted(root.iterdir()):
        m = _PARQUET_RE.match(p.name)
        if m and int(m.group(1)) not in complete:
            problems.append(f"{p}: no sidecar {p.with_suffix('.json').name}, so the shard is incomplete; rerun the stage to redo it")
    return problems


def _shard_problems(shard_set: ShardSet, index: int, manifest: dict) -> list[str]:
    path, info = shard_set.shard_path(index), shard_set.sidecar(index)
    fix = f"delete {path.name} and {path.with_suffix('.json').name} and rerun the stage"
    if not path.exists():
        return [f"{path}: missing although its sidecar exists; {fix}"]
    size = path.stat().st_size
    if size != info["bytes"]:
        return [f"{path}: {size} bytes on disk, {info['bytes']} in the sidecar (truncated or overwritten); {fix}"]
    if file_sha256(path) != info["sha256"]:
        return [f"{path}: sha256 differs from the sidecar (bytes modified); {fix}"]
    try:
        kv = pq.ParquetFile(path).schema_arrow.metadata or {}
    except Exception as err:  # pyarrow raises several types for a bad footer
        return [f"{path}: unreadable Parquet ({err}); {fix}"]
    problems = []
    if kv.get(KV_KIND, b"").decode() != manifest["kind"]:
        problems.append(f"{path}: Parquet metadata kind {kv.get(KV_KIND, b'').decode()!r} differs from the manifest's {manifest['kind']!r}")
    shard_meta = json.loads(kv[KV_METADATA]) if KV_METADATA in kv else None
    if shard_meta != manifest["metadata"]:
        keys = sorted(k for k in set(shard_meta or {}) | set(manifest["metadata"]) if (shard_meta or {}).get(k) != manifest["metadata"].get(k))
        problems.append(f"{path}: Parquet metadata differs from the manifest in {', '.join(keys) or 'lopd.metadata (missing)'} (fingerprints must match across shards)")
    if KV_FORMAT not in kv:
        problems.append(f"{path}: no lopd.format_version in the Parquet metadata")
    return problems


def _manifest_problems(root: Path, manifest: dict, shard_set: ShardSet, complete: list[int]) -> list[str]:
    problems = []
    if not complete:
        problems.append(f"{root}: no complete shard")
    listed = sorted(s["index"] for s in manifest.get("shards", []))
    if listed != complete:
        problems.append(f"{root / MANIFEST}: lists shards {listed}, the sidecars say {complete}; it is rebuilt by ShardSet.finalize() (rerun the stage)")
    expected = manifest.get("expected_shards")
    if expected is not None:
        missing = sorted(set(range(expected)) - set(complete))
        if missing:
            problems.append(f"{root}: {len(missing)} of {expected} expected shards missing (first: {missing[:5]}); rerun the stage to finish it")
    if not manifest.get("complete"):
        problems.append(f"{root}: the manifest is not marked complete (the writing stage did not finish); rerun it")
    return problems
