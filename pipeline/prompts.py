"""Prompt datasets: JSONL or Parquet files, or a ``datasets`` directory, with ``id``, ``prompt`` (or chat
``messages``), optional ``answer`` and ``privileged_context``. Every problem is reported with the file (and the
split), the line/row and the field.

- ``fields`` maps lopd's fields to the source's columns (``{"prompt": "question", "answer": "solution"}``); the
  others keep their names.
- ``messages``: a list of ``{"role": "system" | "user" | "assistant", "content": str}`` turns ending with a user turn,
  rendered with the tokenizer's chat template (``pipeline.models.encode_prompt``); ``prompt`` then defaults to the
  last user turn's text.
- A directory is read with ``datasets``: one saved with ``save_to_disk`` (``load_from_disk``), or a directory of data
  files (``load_dataset(dir)``, offline); ``split`` picks the split of a dataset with several.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import LopdUserError
from storage.shardset import file_sha256

REQUIRED = ("id", "prompt")
OPTIONAL = ("answer", "privileged_context")
FIELDS = ("id", "prompt", "answer", "privileged_context", "messages")
ROLES = ("system", "user", "assistant")


class PromptFileError(LopdUserError):
    """A prompts file that cannot be used; the message names the file, row and field."""


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    answer: str | None = None
    privileged_context: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) chat turns; rendered instead of ``prompt``


def _type_name(value: object) -> str:
    return {list: "a JSON array", dict: "a JSON object", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def _messages(value: object, where: str, column: str) -> tuple[tuple[str, str], ...]:
    turns = value if isinstance(value, list) else None
    if not turns or not all(isinstance(t, dict) and t.get("role") in ROLES and isinstance(t.get("content"), str)
                            for t in turns):
        raise PromptFileError(f"{where}: field '{column}' must be a non-empty list of {{\"role\": one of "
                              f"{'/'.join(ROLES)}, \"content\": a string}} turns, got {json.dumps(value)[:60]}")
    if turns[-1]["role"] != "user":
        raise PromptFileError(f"{where}: field '{column}' must end with a user turn (the model answers it), ends "
                              f"with {turns[-1]['role']!r}")
    return tuple((t["role"], t["content"]) for t in turns)


def _validate(row: object, where: str, fields: dict[str, str] | None = None) -> PromptRecord:
    """One row -> a record; ``fields`` maps lopd's field names to the row's column names."""
    col = {name: (fields or {}).get(name, name) for name in FIELDS}
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected a JSON object with fields {', '.join(REQUIRED)}, got "
                              f"{_type_name(row)}; write one object per line")
    row = {name: row.get(col[name]) for name in FIELDS}
    messages = _messages(row["messages"], where, col["messages"]) if row["messages"] is not None else None
    if messages is not None and row["prompt"] is None:
        row["prompt"] = next(content for role, content in reversed(messages) if role == "user")
    for field in REQUIRED:
        if row[field] is None:
            mapped = f" (lopd's '{field}'; prompt_fields maps it)" if col[field] != field else ""
            raise PromptFileError(f"{where}: missing required field '{col[field]}'{mapped} (each row needs 'id' and "
                                  "'prompt' or 'messages')")
    if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):
        raise PromptFileError(f"{where}: field '{col['id']}' must be a string (or an integer), got "
                              f"{_type_name(row['id'])}")
    for field in ("prompt", *OPTIONAL):
        if row.get(field) is not None and not isinstance(row[field], str):
            raise PromptFileError(f"{where}: field '{col[field]}' must be a string, got {_type_name(row[field])} "
                                  f"{json.dumps(row[field])[:40]}; quote it")
    if not row["prompt"].strip():
        raise PromptFileError(f"{where}: field '{col['prompt']}' is empty; remove the row or give it text")
    return PromptRecord(str(row["id"]), row["prompt"], row.get("answer"), row.get("privileged_context"), messages)


def _load_dataset(path: Path, split: str):  # -> datasets.Dataset
    """Split ``split`` of a ``datasets`` directory (saved with ``save_to_disk``, or data files)."""
    try:
        import datasets
    except ImportError:
        raise PromptFileError(f"{path}: a directory of prompts is read with the `datasets` library, which is not "
                              "installed (pip install datasets); or give a .jsonl / .parquet file") from None
    try:
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(str(path))
    except Exception as e:  # the library's own reasons (no data files, unknown format, damaged arrow files)
        raise PromptFileError(f"{path}: not a readable datasets directory ({type(e).__name__}: {e}); save it with "
                              "Dataset.save_to_disk or put .jsonl / .parquet data files in it") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise PromptFileError(f"{path}: the dataset has splits {sorted(data)}, not {split!r}; set prompt_split")
        data = data[split]
    return data


def _dataset_rows(path: Path, split: str, fields: dict[str, str] | None) -> list[dict]:
    """The rows of split ``split`` of a ``datasets`` directory, after checking it has the columns lopd reads."""
    data = _load_dataset(path, split)
    columns = data.column_names
    col = {name: (fields or {}).get(name, name) for name in FIELDS}
    missing = [col["id"]] * (col["id"] not in columns)
    missing += [col["prompt"]] * (col["prompt"] not in columns and col["messages"] not in columns)
    missing += [c for name, c in (fields or {}).items() if c not in columns and c not in missing]
    if missing:
        raise PromptFileError(f"{path} (split {split}): no column {', '.join(map(repr, missing))}; its columns are "
                              f"{data.column_names}; map them with prompt_fields (e.g. {{prompt: question}})")
    return data.to_list()


def prompts_fingerprint(path: str | Path) -> str:
    """sha256 of a prompts file, or of a directory's files (relative paths and contents)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}:{file_sha256(f)}\n".encode())
    return h.hexdigest()


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


def read_rows(path: str | Path, split: str = "train") -> list[tuple[str, object]]:
    """Every row of a JSONL / Parquet file or a ``datasets`` directory as stored (no mapping, no checks), each with
    where it is (the file, split, line or row) for messages: what benchmark presets (``pipeline.presets``) read."""
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"{path}: not found; check the path")
    if path.is_dir():
        return [(f"{path} (split {split}): row {i}", row) for i, row in enumerate(_load_dataset(path, split).to_list())]
    if path.suffix == ".parquet":
        return [(f"{path}: row {i}", row) for i, row in enumerate(_parquet_rows(path))]
    if path.suffix in (".jsonl", ".json"):
        return [(f"{path}: line {lineno}", row) for lineno, row in _jsonl_rows(path)]
    raise PromptFileError(f"{path}: unsupported format '{path.suffix}'; use .jsonl or .parquet (or a datasets "
                          "directory)")


def _parquet_rows(path: Path) -> list[dict]:
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise PromptFileError(f"{path}: not a readable Parquet file ({e}); write it with pyarrow/pandas/polars or "
                              "use .jsonl") from None


def load_prompts(path: str | Path, limit: int | None = None, fields: dict[str, str] | None = None,
                 split: str = "train") -> list[PromptRecord]:
    """Load and validate every row (all rows are checked before anything is returned). ``fields``: lopd's field ->
    the source's column; ``split``: the split of a ``datasets`` directory."""
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"{path}: prompts file not found; check the path in the config")
    records: list[PromptRecord] = []
    if path.is_dir():
        for i, row in enumerate(_dataset_rows(path, split, fields)):
            records.append(_validate(row, f"{path} (split {split}): row {i}", fields))
    elif path.suffix == ".parquet":
        for i, row in enumerate(_parquet_rows(path)):
            records.append(_validate(row, f"{path}: row {i}", fields))
    elif path.suffix in (".jsonl", ".json"):
        for lineno, row in _jsonl_rows(path):
            records.append(_validate(row, f"{path}: line {lineno}", fields))
    else:
        raise PromptFileError(f"{path}: unsupported prompts format '{path.suffix}'; use .jsonl or .parquet (or a "
                              "datasets directory)")
    require_unique_ids(records, path, "no prompts in file")
    return records[:limit] if limit else records


def require_unique_ids(records: list[PromptRecord], where: str | Path, empty: str) -> None:
    """Refuse an empty set of prompt records (``empty`` says what is missing) or one that repeats an id."""
    if not records:
        raise PromptFileError(f"{where}: {empty}")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PromptFileError(f"{where}: duplicate id '{dup}'; ids must be unique")


def write_prompts_jsonl(records: list[PromptRecord], path: Path) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for r in records:
            row = {"id": r.id, "prompt": r.prompt}
            row.update({k: getattr(r, k) for k in OPTIONAL if getattr(r, k) is not None})
            if r.messages is not None:
                row["messages"] = [{"role": role, "content": content} for role, content in r.messages]
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
