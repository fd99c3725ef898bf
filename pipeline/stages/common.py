"""Pieces every stage shares: the result object, input checks, timing, per-shard seeds."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import BaseModel

from pipeline.hub import not_cached_hint
from storage.errors import MissingInputError
from storage.shardset import ShardSet, ShardSetError, ShardSetNotFoundError


@dataclass
class StageResult:
    """What a stage did: where its output is, whether it was already complete, and its counts."""

    stage: str
    out: Path
    skipped: bool = False
    wall_seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "out": str(self.out), "skipped": self.skipped,
                "wall_seconds": round(self.wall_seconds, 3), **self.summary}


def _source(field: str, made_by: str | None, what: str) -> str:
    point = f"point {field} at {what}"
    return f"run `{made_by}` first, or {point}" if made_by else point


def require_model_dir(path: Path, *, field: str, made_by: str | None = None) -> None:
    """Refuse, before anything is loaded, a model input that is missing or is not a model directory
    (config.json, weight files, tokenizer). ``made_by`` is the command that writes it (None: the user's own)."""
    path = Path(path)
    fix = _source(field, made_by, "a Hugging Face model directory (config.json, *.safetensors, tokenizer files)")
    if not path.exists():
        why = not_cached_hint(path) or "does not exist"  # a hub id: config validation found it in no local cache
        raise MissingInputError(f"{field}: {path} {why}; {fix}")
    if not path.is_dir():
        raise MissingInputError(f"{field}: {path} is a file, not a model directory; {fix}")
    lacks = [name for name, ok in (
        ("config.json", (path / "config.json").is_file()),
        ("weight files (*.safetensors / *.bin)", any(p.suffix in (".safetensors", ".bin") for p in path.iterdir())),
        ("tokenizer files", any((path / n).is_file()
                                for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))),
    ) if not ok]
    if lacks:
        raise MissingInputError(f"{field}: {path} is not a model directory (no {', no '.join(lacks)}); {fix}")


def require_shard_set(path: Path, *, kind: str, field: str, made_by: str) -> ShardSet:
    """Open a finished, intact shard set of ``kind`` or refuse naming the field, the problem and the command
    that writes it; nothing is loaded before this passes."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a shard set directory" if path.exists() else "does not exist"
        raise MissingInputError(f"{field}: {path} {what}; {_source(field, made_by, 'its output')}")
    try:
        shard_set = ShardSet.open(path)
    except ShardSetNotFoundError as err:
        raise MissingInputError(f"{field}: {err} (it is written by `{made_by}`)") from None
    if shard_set.kind != kind:
        raise MissingInputError(f"{field}: {path} holds {shard_set.kind!r} shards, this stage reads {kind!r}; "
                                f"point {field} at the output of `{made_by}`")
    try:
        shard_set.require_intact()
    except ShardSetError as err:
        raise type(err)(f"{field}: {err} (it is written by `{made_by}`)") from None
    return shard_set


def shard_seed(seed: int, shard_index: int) -> int:
    """A shard's own seed, so a redone shard samples exactly what the first attempt would have."""
    return (seed * 1_000_003 + shard_index * 7919) % (2**31 - 1)


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    box = {"start": time.perf_counter(), "seconds": 0.0}
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - box["start"]


def chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def stage_config_path(name: str, cfg: BaseModel) -> Path:
    """Where a stage records the config it ran with: ``config.yaml`` in its output directory; for ``sft``, whose
    output is the exported model directory, in ``<out>_logs`` beside its metrics; ``config.part-I.yaml`` for one
    part of a stage whose shards are split over workers (``num_parts`` > 1)."""
    out = Path(cfg.out)  # type: ignore[attr-defined]
    if name == "sft":
        return out.with_name(out.name + "_logs") / "config.yaml"
    parts = getattr(cfg, "num_parts", 1)
    return out / (f"config.part-{cfg.part}.yaml" if parts > 1 else "config.yaml")  # type: ignore[attr-defined]


def write_stage_config(name: str, cfg: BaseModel) -> Path:
    """Write the resolved config a stage ran with (defaults, file and every ``--set``; paths resolved) beside its
    output, atomically. ``lopd run --dry-run`` compares it with the current config."""
    path = stage_config_path(name, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# The resolved `{name}` section this stage last completed with (defaults and --set filled in).\n"
              f"# Rerun it: lopd {name.replace('_', '-')} -c {path.name} --run-dir RUN_DIR\n")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(header + yaml.safe_dump({name: cfg.model_dump(mode="json")}, sort_keys=False, width=120))
    tmp.replace(path)
    return path


def read_stage_config(name: str, cfg: BaseModel) -> dict[str, Any] | None:
    """The stage section recorded beside ``cfg``'s output by ``write_stage_config`` (None when there is none)."""
    path = stage_config_path(name, cfg)
    if not path.is_file():
        return None
    return (yaml.safe_load(path.read_text()) or {}).get(name)
