"""Prefect's cache for the stage tasks: the cache key of a stage run and when it must be ignored.

A stage task's cache key hashes the stage name, its validated config (JSON) and the fingerprint of every input
path in it (model dirs: ``model_fingerprint``; shard dirs: their ``manifest.json``; files: sha256). A cache hit
returns the stage's stored result without loading a model. Results are stored as JSON in
``<run_dir>/.prefect/results``. The cache is a shortcut, never the resume mechanism: a stage whose output
directory is missing or empty is recomputed (``refresh``), and the stage function itself skips the shards,
checkpoints and model dirs that are already complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect.context import TaskRunContext
from pydantic import BaseModel

from pipeline.fingerprint import model_fingerprint
from storage.shardset import file_sha256

RESULTS_DIR = ".prefect/results"  # inside run_dir


def input_fingerprint(path: Path) -> str | None:
    """Fingerprint of one stage input (model dir, shard dir or file); None when it does not exist yet."""
    if path.is_file():
        return "file-" + file_sha256(path)[:16]
    if (path / "config.json").is_file():
        return model_fingerprint(path)
    if (path / "manifest.json").is_file():
        return "shards-" + file_sha256(path / "manifest.json")[:16]
    return None


def stage_inputs(cfg: BaseModel, prefix: str = "") -> dict[str, Path]:
    """Every path a stage config reads: its path fields except ``out``, nested sections (and lists of them)
    included."""
    paths: dict[str, Path] = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, Path) and name != "out":
            paths[prefix + name] = value
        elif isinstance(value, BaseModel):
            paths.update(stage_inputs(value, prefix=f"{prefix}{name}."))
        elif isinstance(value, list):  # e.g. train.shards listing several shard sets
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    paths.update(stage_inputs(item, prefix=f"{prefix}{name}.{i}."))
    return paths


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Hash of task name, stage config and input fingerprints; None (no caching) while an input is missing."""
    cfg: BaseModel = parameters["cfg"]
    fingerprints = {}
    for field, path in stage_inputs(cfg).items():
        fingerprint = input_fingerprint(path)
        if fingerprint is None:
            return None
        fingerprints[field] = fingerprint
    payload = json.dumps({"task": context.task.name, "config": cfg.model_dump(mode="json"), "inputs": fingerprints},
                         sort_keys=True)
    return f"lopd-{context.task.name}-{hashlib.sha256(payload.encode()).hexdigest()[:32]}"


# The options of every cached stage task: the key above, results kept as JSON (in ``result_storage``).
CACHED: dict[str, Any] = {"cache_key_fn": stage_cache_key, "persist_result": True, "result_serializer": "json"}


def result_storage(run_dir: Path) -> Path:
    """Where a run's task results (the cache's values) are stored."""
    return Path(run_dir).resolve() / RESULTS_DIR


def refresh(out: Path) -> bool:
    """A stage whose output directory is missing or empty runs again whatever the cache holds."""
    return not (out.is_dir() and any(out.iterdir()))
