"""Prompt datasets: JSONL or Parquet files with ``id``, ``prompt``, optional ``answer`` and
``privileged_context``. Every problem is reported with the file, the line/row and the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import LopdUserError

REQUIRED = ("id", "prompt")
OPTIONAL = ("answer", "privileged_context")


class PromptFileError(LopdUserError):
    """A prompts file that cannot be used; the message names the file, row and field."""


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    answer: str | None = None
    privileged_context: str | None = None


def _type_name(value: object) -> str:
    return {list: "a JSON array", dict: "a JSON object", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def _validate(row: object, where: str) -> PromptRecord:
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected a JSON object with fields {', '.join(REQUIRED)}, got "
                              f"{_type_name(row)}; write one object per line")
    for field in REQUIRED:
        if field not in row or row[field] is None:
            raise PromptFileError(f"{where}: missing required field '{field}' (each row needs 'id' and 'prompt')")
    if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):
        raise PromptFileError(f"{where}: field 'id' must be a string (or an integer), got {_type_name(row['id'])}")
    for field in ("prompt", *OPTIONAL):
        if row.get(field) is not None and not isinstance(row[field], str):
            raise PromptFileError(f"{where}: field '{field}' must be a string, got {_type_name(row[field])} "
                                  f"{json.dumps(row[field])[:40]}; quote it")
    if not row["prompt"].strip():
        raise PromptFileError(f"{where}: field 'prompt' is empty; remove the row or give it text")
    return PromptRecord(str(row["id"]), row["prompt"], row.get("answer"), row.get("privileged_context"))


def _jsonl_rows(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed JSON) per non-blank line; UTF-8 with or without a BOM, LF or CRLF line ends."""
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise PromptFileError(f"{path}: line {lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                      f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            if not rows and line.lstrip().startswith("["):
                raise PromptFileError(f"{path}: line {lineno}: a JSON array; prompts files are JSON Lines, one object "
                                      "per line (convert with: jq -c '.[]' FILE)")
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}: line {lineno}: invalid JSON ({e.msg}); one JSON object per "
                                      "line") from None
    return rows


def load_prompts(path: str | Path, limit: int | None = None) -> list[PromptRecord]:
    """Load and validate every row (all rows are checked before anything is returned)."""
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"{path}: prompts file not found; check the path in the config")
    if not path.is_file():
        raise PromptFileError(f"{path}: is a directory, not a prompts file (.jsonl or .parquet)")
    records: list[PromptRecord] = []
    if path.suffix == ".parquet":
        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise PromptFileError(f"{path}: not a readable Parquet file ({e}); write it with pyarrow/pandas/polars or "
                                  "use .jsonl") from None
        for i, row in enumerate(rows):
            records.append(_validate(row, f"{path}: row {i}"))
    elif path.suffix in (".jsonl", ".json"):
        for lineno, row in _jsonl_rows(path):
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
