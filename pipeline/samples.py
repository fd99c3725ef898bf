"""The samples table: teacher SFT data and SFT-student rollouts (one row per sampled answer).

Columns: ``prompt_id``, ``sample_index``, ``token_ids`` (prompt + response, exactly as sampled: scoring
reuses these ids and never re-tokenises text), ``prompt_len``, ``behavior_logprobs`` (log-prob of each
response token under the distribution it was sampled from), ``finish_reason``, ``reward`` (checker
result, null without a checker) and ``response_text`` (decoded, for people).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SAMPLES_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("sample_index", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
        ("prompt_len", pa.int32()),
        ("behavior_logprobs", pa.list_(pa.float32())),
        ("finish_reason", pa.string()),
        ("reward", pa.float32()),
        ("response_text", pa.string()),
    ]
)


@dataclass
class SampleRow:
    prompt_id: str
    sample_index: int
    token_ids: list[int]
    prompt_len: int
    behavior_logprobs: list[float]
    finish_reason: str
    reward: float | None
    response_text: str


def rows_to_table(rows: list[SampleRow]) -> pa.Table:
    cols = {name: [getattr(r, name) for r in rows] for name in SAMPLES_SCHEMA.names}
    return pa.table(cols, schema=SAMPLES_SCHEMA)
