"""Prompt datasets: JSONL or Parquet files with ``id``, ``prompt``, optional ``answer`` and
``privileged_context``. Every problem is reported with the file, the line/row and the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

REQUIRED = ("id", "prompt")
OPTIONAL = ("answer", "privileged_context")


class PromptFileError(ValueError):
    """A prompts file that cannot be used; the message names the file, row and field."""


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    answer: str | None = None
    privileged_context: str | None = None


def _validate(row: object, where: str) -> PromptRecord:
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected a JSON object with fields {REQUIRED}, got {type(row).__name__}")
    for field in REQUIRED:
        if field not in row or row[field] is None:
            raise PromptFileError(f"{where}: missing required field '{field}' (each row needs 'id' and 'prompt')")
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise PromptFileError(f"{where}: field 'prompt' is empty; remove the row or give it text")
    for field in OPTIONAL:
        if row.get(field) is not None and not isinstance(row[field], str):
            raise PromptFileError(f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}")
    return PromptRecord(str(row["id"]), row["prompt"], row.get("answer"), row.get("privileged_context"))


def load_prompts(path: str | Path, limit: int | None = None) -> list[PromptRecord]:
    """Load and validate every row (all rows are checked before anything is returned)."""
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"{path}: prompts file not found")
    records: list[PromptRecord] = []
    if path.suffix == ".parquet":
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            records.append(_validate(row, f"{path}: row {i}"))
    elif path.suffix in (".jsonl", ".json"):
        with path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PromptFileError(f"{path}: line {lineno}: invalid JSON ({e.msg}); one JSON object per line") from None
                records.append(_validate(row, f"{path}: line {lineno}"))
    else:
        raise PromptFileError(f"{path}: unsupported prompts format '{path.suffix}'; use .jsonl or .parquet")
    if not records:
        raise PromptFileError(f"{path}: no prompts in file")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PromptFileError(f"{path}: duplicate id '{dup}'; ids must be unique")
    return records[:limit] if limit else records


def write_prompts_jsonl(records: list[PromptRecord], path: Path) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for r in records:
            row = {"id": r.id, "prompt": r.prompt}
            row.update({k: getattr(r, k) for k in OPTIONAL if getattr(r, k) is not None})
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
