"""Benchmark presets: a local copy of a common math set, in the layout its hub dataset has, turned into a lopd
prompts file (``id``, ``prompt``, ``answer``) for ``lopd eval`` (``checker: math``) or as training prompts.

    lopd prompts preset aime24 --from PATH --out data/aime24.jsonl

``PATH`` is what ``load_dataset(...).save_to_disk`` wrote, a directory of the dataset's data files (a hub snapshot),
or one .jsonl / .parquet file. The layouts (2026-12, as the dataset cards and lighteval's / verl's loaders read them):

- ``aime24``: HuggingFaceH4/aime_2024, split train: id (int), problem, solution, answer, url, year.
- ``aime25``: math-ai/aime25, split test: problem, answer, id; also yentinglin/aime_2025 (id, problem, solution,
  answer, url, year; split train: pass ``--split train``) and opencompass/AIME2025 (question, answer; one config per
  exam, AIME2025-I and AIME2025-II: ids are ``aime25-<row>``, so convert one exam per file, or both into one dir).
- ``math500``: HuggingFaceH4/MATH-500, split test: problem, solution, answer, subject, level, unique_id.
- ``gsm8k``: openai/gsm8k (config main), splits train / test: question, answer (the worked solution, then
  ``#### <number>``).

Answers are written as the checker compares them: GSM8K's number after ``#### `` with thousands separators removed
(``1,234`` -> ``1234``); AIME's integer without leading zeros (``033`` -> ``33``); MATH-500's LaTeX as given (the
``math`` checker, math-verify, compares it symbolically). The prompt is the problem followed by ``instruction``
(by default the ``\\boxed{}`` request that DeepSeek-R1's and Qwen's math evaluations use; "" leaves it out).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.prompts import PromptFileError, PromptRecord, read_rows, require_unique_ids, write_prompts_jsonl

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _gsm8k_answer(value: object, where: str) -> str:
    match = re.search(r"####\s*(.+?)\s*$", str(value))
    if match is None:
        raise PromptFileError(f"{where}: GSM8K's answer column has no '#### <number>' final line: "
                              f"{str(value)[-60:]!r}")
    return match.group(1).replace(",", "")


def _aime_answer(value: object, where: str) -> str:
    text = str(value).strip()
    if not text.isdigit():
        raise PromptFileError(f"{where}: an AIME answer is an integer from 0 to 999, got {text[:40]!r}")
    return str(int(text))


def _latex_answer(value: object, where: str) -> str:
    text = str(value).strip()
    if not text:
        raise PromptFileError(f"{where}: empty answer")
    return text


@dataclass(frozen=True)
class Preset:
    """One benchmark's layout: its hub dataset and default split, the columns holding the problem and the id (the
    first present is used; no id column: ``<name>-<row index>``), and how its answer column becomes the answer."""

    dataset: str
    split: str
    problem: tuple[str, ...]
    id: tuple[str, ...]
    answer: Callable[[object, str], str]


PRESETS: dict[str, Preset] = {
    "aime24": Preset("HuggingFaceH4/aime_2024", "train", ("problem",), ("id",), _aime_answer),
    "aime25": Preset("math-ai/aime25", "test", ("problem", "question"), ("id",), _aime_answer),
    "math500": Preset("HuggingFaceH4/MATH-500", "test", ("problem",), ("unique_id",), _latex_answer),
    "gsm8k": Preset("openai/gsm8k", "test", ("question",), (), _gsm8k_answer),
}


def preset_records(name: str, source: str | Path, split: str | None = None,
                   instruction: str = INSTRUCTION) -> list[PromptRecord]:
    """The prompt records of benchmark ``name`` read from a local copy ``source`` (``split``: of a datasets
    directory; None = the preset's own). Every problem names the source, the row and the column."""
    preset = PRESETS[name]
    split = split or preset.split
    records = []
    for i, (where, row) in enumerate(read_rows(source, split)):
        if not isinstance(row, dict):
            raise PromptFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
        problem_col = next((c for c in preset.problem if c in row), None)
        missing = [c for c, ok in ((" or ".join(preset.problem), problem_col), ("answer", "answer" in row)) if not ok]
        if missing:
            raise PromptFileError(f"{where}: no column {', '.join(map(repr, missing))} ({name}'s layout, as "
                                  f"{preset.dataset} has it); its columns are {sorted(row)}")
        id_col = next((c for c in preset.id if row.get(c) is not None), None)
        prompt = str(row[problem_col]).strip() + (f"\n\n{instruction}" if instruction else "")
        records.append(PromptRecord(id=str(row[id_col]) if id_col else f"{name}-{i}", prompt=prompt,
                                    answer=preset.answer(row["answer"], f"{where}: column 'answer'")))
    require_unique_ids(records, source, "no rows")
    return records


def write_preset(name: str, source: str | Path, out: str | Path, split: str | None = None,
                 instruction: str = INSTRUCTION) -> int:
    """Write benchmark ``name`` from ``source`` as a lopd prompts file ``out`` (JSONL); returns the row count."""
    records = preset_records(name, source, split, instruction)
    write_prompts_jsonl(records, Path(out))
    return len(records)
