"""storage/inspect.py's readable export and pipeline/shards_view.py: `lopd shards export --readable` read back by
polars, duckdb and pyarrow without lopd; `lopd shards show` on real tiny-model shards."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from storage.codecs import decode_table, encode_records
from storage.errors import LopdUserError
from storage.inspect import export_readable, records_table
from storage.shardset import ShardSet
from storage.synthetic import make_records
from tests.conftest import lopd


@pytest.mark.parametrize("k", [0, 3])
def test_records_table_holds_every_record_exactly(k):
    records = make_records(vocab_size=50, k=3, num_rollouts=3, response_len=5)
    if k == 0:  # Lightning-only shards: no top-k, all the mass in the tail
        records = [dataclasses.replace(r, topk_ids=r.topk_ids[:, :0], topk_logprobs=r.topk_logprobs[:, :0],
                                       tail_logprob=np.zeros_like(r.tail_logprob)) for r in records]
    records = decode_table(encode_records(records, "plain", k, 50))  # as a shard returns them
    rows = records_table(records).to_pylist()
    for record, row in zip(records, rows):
        assert row["token_ids"] == record.token_ids.tolist() and row["prompt_len"] == record.prompt_len
        assert row["teacher_logprobs"] == record.teacher_logprobs.tolist()
        assert row["topk_ids"] == record.topk_ids.tolist() and row["topk_logprobs"] == record.topk_logprobs.tolist()
        assert len(row["topk_ids"]) == record.num_response_tokens and all(len(p) == k for p in row["topk_ids"])
        assert row["tail_logprob"] == record.tail_logprob.tolist()


@pytest.mark.integration
def test_readable_export_is_read_by_polars_and_duckdb_without_lopd(shards_run, tmp_path):
    tmp, _ = shards_run
    src = tmp / "run" / "teacher_topk"
    out = tmp_path / "readable"
    summary = json.loads(lopd("shards", "export", str(src), "--readable", str(out)).stdout)
    shards = ShardSet.open(src)
    records = [r for i in shards.complete_indices() for r in decode_table(shards.read_shard(i))]
    assert summary["rows"] == len(records) == 96 and len(summary["files"]) == len(shards.complete_indices())
    assert pq.read_schema(summary["files"][0]).metadata is None  # no lopd codec metadata: plain Parquet

    df = pl.read_parquet(out / "*.parquet")
    assert df.schema["topk_ids"] == pl.List(pl.List(pl.Int32)) and df.schema["teacher_logprobs"] == pl.List(pl.Float32)
    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(tmp / "run" / "sft_student")
    for record, row in zip(records, df.iter_rows(named=True)):
        assert (row["prompt_id"], row["sample_index"]) == (record.prompt_id, record.sample_index)
        assert row["token_ids"] == record.token_ids.tolist()
        assert np.array_equal(np.array(row["topk_logprobs"], dtype=np.float32), record.topk_logprobs)
        assert row["topk_ids"] == record.topk_ids.tolist()
        assert row["tokens"] == [tokenizer.decode([t]) for t in record.token_ids.tolist()]
        assert row["topk_tokens"][0] == [tokenizer.decode([t]) for t in record.topk_ids[0].tolist()]

    import duckdb

    got = duckdb.sql(f"select prompt_id, sample_index, len(teacher_logprobs) as r, topk_ids[1][1] as top1 "
                     f"from read_parquet('{out}/*.parquet') order by prompt_id, sample_index").fetchall()
    want = sorted((r.prompt_id, r.sample_index, r.num_response_tokens, int(r.topk_ids[0, 0])) for r in records)
    assert got == want

    rollouts = json.loads(lopd("shards", "export", str(tmp / "run" / "rollouts"), "--readable",
                               str(tmp_path / "rollouts"), "--no-text").stdout)
    plain = pl.read_parquet(rollouts["files"][0])
    assert plain.columns == ShardSet.open(tmp / "run" / "rollouts").read_shard(0).column_names

    with pytest.raises(LopdUserError, match="is a shard set; export to a new directory"):
        export_readable(src, tmp / "run" / "rollouts")


@pytest.mark.integration
def test_shards_show_prints_tokens_and_the_teachers_top_k(shards_run):
    tmp, _ = shards_run
    src = tmp / "run" / "teacher_topk"
    shown = lopd("shards", "show", str(src), "--rows", "2", "--positions", "3", "--top", "2").stdout
    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(tmp / "run" / "sft_student")
    first, second = decode_table(ShardSet.open(src).read_shard(0))[:2]
    for record in (first, second):
        assert f"{record.prompt_id} / sample {record.sample_index}" in shown
        assert "prompt: " + tokenizer.decode(record.token_ids[: record.prompt_len].tolist()) in shown
    lines = shown.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("t "))
    assert "teacher top-2 (p)" in lines[header] and f"outside top-{first.topk_ids.shape[1]}" in lines[header]
    for t in range(3):
        cells = lines[header + 1 + t].split()
        top = [(tokenizer.decode([int(i)]), f"{math.exp(lp):.3f}")
               for i, lp in zip(first.topk_ids[t, :2], first.topk_logprobs[t, :2])]
        assert cells[0] == str(t) and cells[1] == tokenizer.decode([int(first.response_ids[t])])
        assert cells[2] == f"{math.exp(first.teacher_logprobs[t]):.3f}"
        assert cells[3] == f"{math.exp(first.behavior_logprobs[t]):.3f}"
        assert cells[4:8] == [x for pair in top for x in pair]
        assert cells[8] == f"{math.exp(first.tail_logprob[t]):.3f}"
