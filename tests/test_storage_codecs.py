"""Top-k codecs and records: exact fields stay exact, lossy fields stay within the stated bounds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from storage import compact as ck
from storage.codecs import codec_info, decode_table, encode_records
from storage.records import TAIL_LOGPROB_FLOOR, TeacherRecord, compute_tail_logprob
from storage.synthetic import make_records
from tests.storage_helpers.reference_decoder import decode_row_numpy_only

COMMON_EXACT = ("token_ids", "teacher_logprobs", "behavior_logprobs")


def _assert_common_exact(a: TeacherRecord, b: TeacherRecord) -> None:
    assert ((a.prompt_id, a.sample_index, a.prompt_len, a.reward)
            == (b.prompt_id, b.sample_index, b.prompt_len, b.reward))
    for name in COMMON_EXACT:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name  # bit-exact float32 / int32


def _within_half_step(exact: np.ndarray, decoded: np.ndarray, p: ck.CompactParams) -> bool:
    """The exact value lies within half a grid interval of the decoded grid point (the rounding bound)."""
    c = ck.quantize_logprobs(decoded, p).astype(np.float64)
    assert np.allclose(ck.dequantize_logprobs(c, p), decoded, atol=1e-5)  # decoded values are grid points
    upper = np.minimum(ck.dequantize_logprobs(c - 0.5, p), 0.0) + 1e-5
    lower = ck.dequantize_logprobs(np.minimum(c + 0.5, p.max_code), p) - 1e-5
    clamped = np.maximum(exact, TAIL_LOGPROB_FLOOR)
    return bool(np.all((clamped <= upper) & (clamped >= lower)))


def _kl_topk(exact: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """KL(exact || decoded) per position over the top-k support, both renormalised."""
    p = np.exp(exact.astype(np.float64))
    q = np.exp(decoded.astype(np.float64))
    p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    return (p * (np.log(p) - np.log(q))).sum(1)


@pytest.fixture(scope="module")
def records_large_vocab() -> list[TeacherRecord]:
    recs = make_records(5000, 32, num_rollouts=6, response_len=40, seed=1)
    recs[1] = dataclasses.replace(recs[1], reward=None)
    # force responses whose sampled token is not in the top-k (the codec must not rely on it)
    tok = recs[2].token_ids.copy()
    tok[recs[2].prompt_len :] = 4999
    recs[2] = dataclasses.replace(recs[2], token_ids=tok)
    return recs


def test_plain_round_trip_is_exact_up_to_float16(records_large_vocab):
    out = decode_table(encode_records(records_large_vocab, "plain", 32, 5000))
    for a, b in zip(records_large_vocab, out, strict=True):
        _assert_common_exact(a, b)
        assert np.array_equal(a.topk_ids, b.topk_ids)  # ids and their order exact
        assert np.array_equal(a.tail_logprob, b.tail_logprob)
        assert np.all(np.abs(a.topk_logprobs - b.topk_logprobs) <= np.abs(a.topk_logprobs) * 2**-11 + 1e-7)


@pytest.mark.parametrize("vocab,k", [(5000, 32), (20, 8), (400, 300), (50, 1)])
def test_compact_round_trip_within_stated_error(vocab, k):
    recs = make_records(vocab, k, num_rollouts=5, response_len=30, seed=k)
    params = ck.CompactParams()
    out = decode_table(encode_records(recs, "compact", k, vocab))
    for a, b in zip(recs, out, strict=True):
        _assert_common_exact(a, b)
        # ids exact as a set per position; each id keeps its own log-prob within half a grid step
        order_a, order_b = np.argsort(a.topk_ids, 1), np.argsort(b.topk_ids, 1)
        assert np.array_equal(np.take_along_axis(a.topk_ids, order_a, 1), np.take_along_axis(b.topk_ids, order_b, 1))
        lp_a = np.take_along_axis(a.topk_logprobs, order_a, 1)
        lp_b = np.take_along_axis(b.topk_logprobs, order_b, 1)
        assert _within_half_step(lp_a, lp_b, params)
        assert _within_half_step(a.tail_logprob, b.tail_logprob, params)
        # decoded order: descending log-prob, ties by ascending id; the teacher's order where codes differ
        assert np.all(np.diff(b.topk_logprobs, axis=1) <= 0)
        tie = np.diff(b.topk_logprobs, axis=1) == 0
        assert np.all(np.diff(b.topk_ids, axis=1)[tie] > 0)
        codes = ck.quantize_logprobs(a.topk_logprobs, params)
        strict = np.all(np.diff(codes.astype(int), axis=1) > 0, axis=1)
        assert np.array_equal(a.topk_ids[strict], b.topk_ids[strict])
        if len(a.topk_ids):
            assert _kl_topk(a.topk_logprobs, b.topk_logprobs).mean() <= 1e-3


def test_compact_handles_absent_sampled_tokens_empty_and_null(records_large_vocab):
    empty = dataclasses.replace(
        records_large_vocab[0], prompt_id="empty", token_ids=records_large_vocab[0].token_ids[:4], prompt_len=4,
        teacher_logprobs=np.zeros(0, np.float32), behavior_logprobs=np.zeros(0, np.float32),
        topk_ids=np.zeros((0, 32), np.int32), topk_logprobs=np.zeros((0, 32), np.float32),
        tail_logprob=np.zeros(0, np.float32),
    )
    recs = [*records_large_vocab, empty]
    out = decode_table(encode_records(recs, "compact", 32, 5000))
    assert out[1].reward is None and out[-1].topk_ids.shape == (0, 32)
    for a, b in zip(recs, out, strict=True):
        assert np.array_equal(np.sort(a.topk_ids, 1), np.sort(b.topk_ids, 1))
    assert decode_table(encode_records([], "compact", 32, 5000)) == []


def test_compact_schema_decodes_with_numpy_only_reference(records_large_vocab):
    """storage/SCHEMA.md is enough to decode: an independent loop-based decoder written from it agrees."""
    table = encode_records(records_large_vocab, "compact", 32, 5000)
    out = decode_table(table)
    meta = codec_info("compact", 32, 5000)
    for i, rec in enumerate(out):
        row = {name: table[name][i].as_py() for name in table.column_names}
        ids, lp, tail = decode_row_numpy_only(row, meta)
        assert np.array_equal(ids, rec.topk_ids)
        assert np.allclose(lp, rec.topk_logprobs, atol=1e-5) and np.allclose(tail, rec.tail_logprob, atol=1e-5)


def _record(ids: np.ndarray, lp: np.ndarray, sampled: np.ndarray, prompt_id: str = "edge") -> TeacherRecord:
    r = ids.shape[0]
    teacher = np.full(r, -0.5, np.float32)
    return TeacherRecord(
        prompt_id=prompt_id, sample_index=0, token_ids=np.concatenate([[1, 2], sampled]).astype(np.int32), prompt_len=2,
        teacher_logprobs=teacher, behavior_logprobs=teacher - 0.25, topk_ids=ids.astype(np.int32),
        topk_logprobs=lp.astype(np.float32), tail_logprob=compute_tail_logprob(lp.astype(np.float32)), reward=1.0,
    )


def _edge_records(rng: np.random.Generator, k: int, vocab: int, positions: int,
                  lp_rows: np.ndarray) -> list[TeacherRecord]:
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(positions)])
    if vocab > 2**20:  # the largest ids the format holds
        ids[:, -1] = vocab - 1 - np.arange(positions)
    lp = np.sort(lp_rows, axis=1)[:, ::-1]
    sampled = np.where(rng.random(positions) < 0.7, ids[np.arange(positions), rng.integers(0, k, positions)], vocab - 1)
    return [_record(ids[:8], lp[:8], sampled[:8], "a"), _record(ids[8:], lp[8:], sampled[8:], "b")]


@pytest.mark.parametrize("case", ["k1", "all_equal", "long_runs", "max_ids", "k300"])
def test_compact_run_coding_edge_cases_round_trip(case):
    """Runs of every shape (one entry, one run spanning the position, runs longer than a nibble, codes
    and steps past the nibble cap, ids up to 2^31 - 2) decode exactly, and match the reference decoder."""
    rng = np.random.default_rng(7)
    positions = 20
    k, vocab = {"k1": (1, 50), "all_equal": (40, 5000), "long_runs": (64, 5000), "max_ids": (16, 2**31 - 1),
                "k300": (300, 400)}[case]
    if case == "k1":
        lp = -rng.uniform(0, 60, (positions, 1))
    elif case == "all_equal":
        lp = np.full((positions, k), -9.0)
    elif case == "long_runs":  # a few long plateaus, the first far from the top (big steps), lengths 1..40
        lp = np.concatenate([np.full((positions, 40), -12.0), np.full((positions, 17), -25.0),
                             -rng.uniform(0, 69, (positions, 7))], 1)
    else:
        lp = -rng.exponential(8.0, (positions, k))
    recs = _edge_records(rng, k, vocab, positions, lp)
    params = ck.CompactParams()
    table = encode_records(recs, "compact", k, vocab)
    out = decode_table(table)
    meta = codec_info("compact", k, vocab)
    for i, (a, b) in enumerate(zip(recs, out, strict=True)):
        _assert_common_exact(a, b)
        assert np.array_equal(np.sort(a.topk_ids, 1), np.sort(b.topk_ids, 1))
        order_a, order_b = np.argsort(a.topk_ids, 1), np.argsort(b.topk_ids, 1)
        assert np.array_equal(ck.quantize_logprobs(np.take_along_axis(a.topk_logprobs, order_a, 1), params),
                              ck.quantize_logprobs(np.take_along_axis(b.topk_logprobs, order_b, 1), params))
        assert np.array_equal(ck.quantize_logprobs(a.tail_logprob, params),
                              ck.quantize_logprobs(b.tail_logprob, params))
        ids, lp_ref, tail = decode_row_numpy_only({name: table[name][i].as_py() for name in table.column_names}, meta)
        assert np.array_equal(ids, b.topk_ids)
        assert np.allclose(lp_ref, b.topk_logprobs, atol=1e-5) and np.allclose(tail, b.tail_logprob, atol=1e-5)


def test_run_kernel_round_trip_and_caps():
    rng = np.random.default_rng(3)
    for k in (1, 2, 15, 16, 17, 50):
        for _ in range(20):
            codes = np.sort(rng.choice([0, 1, 14, 15, 16, 30, 31, 84, 200, 255], size=(6, k)), axis=1).astype(np.uint8)
            run_byte, first, extra, extra_run = ck.encode_runs(codes)
            assert np.array_equal(ck.run_extra_counts(run_byte), np.bincount(extra_run, minlength=run_byte.size))
            decoded, length = ck.decode_runs(run_byte, extra, 6, k, 255)
            assert np.array_equal(decoded, codes) and np.array_equal(np.diff(np.append(first, codes.size)), length)
    # one run per position: length field 0; K = 1: the byte holds the code
    run_byte, _, extra, _ = ck.encode_runs(np.array([[3, 3, 3], [40, 40, 40]], np.uint8))
    assert run_byte.tolist() == [0x30, 0xF0] and extra.tolist() == [25]
    with pytest.raises(ValueError, match="corrupt"):
        ck.decode_runs(np.array([0x32], np.uint8), np.zeros(0, np.int64), 1, 3, 255)  # a run of 2 and no last run
    with pytest.raises(ValueError, match="corrupt"):
        ck.decode_runs(np.array([0x33, 0x10], np.uint8), np.zeros(0, np.int64), 1, 3, 255)  # a non-last run reaching K


def test_old_compact_version_is_refused_clearly(records_large_vocab):
    import json

    table = encode_records(records_large_vocab[:2], "compact", 32, 5000)
    info = json.loads(table.schema.metadata[b"lopd.codec"])
    old = table.replace_schema_metadata({b"lopd.codec": json.dumps({**info, "codec_version": 1}).encode()})
    with pytest.raises(ValueError, match="version 1.*older lopd"):
        decode_table(old)
    plain = encode_records(records_large_vocab[:2], "plain", 32, 5000)
    assert json.loads(plain.schema.metadata[b"lopd.codec"])["codec_version"] == 1  # plain's layout did not change


def test_compact_is_much_smaller_than_plain_at_large_vocab(records_large_vocab):
    import io

    import pyarrow.parquet as pq

    sizes = {}
    for codec in ("plain", "compact"):
        buf = io.BytesIO()
        pq.write_table(encode_records(records_large_vocab, codec, 32, 5000), buf, compression="zstd",
                       write_statistics=False)
        sizes[codec] = len(buf.getvalue())
    assert sizes["compact"] < 0.5 * sizes["plain"]


def test_quantizer_is_monotone_and_within_half_step():
    p = ck.CompactParams()
    lp = -np.concatenate([np.linspace(0, 80, 20001), np.logspace(-8, 0, 500)])
    codes = ck.quantize_logprobs(lp, p)
    order = np.argsort(-lp)
    assert np.all(np.diff(codes[order].astype(int)) >= 0)  # smaller log-prob never gets a smaller code
    decoded = ck.dequantize_logprobs(codes, p)
    assert _within_half_step(lp, decoded, p)
    head = lp >= np.log(p.knee_prob)
    assert np.abs(decoded - lp)[head].max() <= p.head_step / 2 + 1e-6
    assert codes.max() <= p.max_code <= 255


def test_compact_params_are_validated():
    with pytest.raises(ValueError, match="head_step"):
        ck.CompactParams(head_step=0.0)
    with pytest.raises(ValueError, match="uint8"):
        ck.CompactParams(head_step=0.01, max_step=0.02)
    with pytest.raises(ValueError, match="parameters are"):
        codec_info("compact", 8, 20, step=0.1)
    with pytest.raises(ValueError, match="no parameters"):
        codec_info("plain", 8, 20, head_step=0.1)


@pytest.mark.parametrize("x", [[0, 1, 6, 7, 8, 9, 15, 16, 100, 151935, 2**31 - 1]])
def test_integer_symbols_round_trip(x):
    x = np.array(x, dtype=np.int64)
    sym, width, raw = ck.int_to_symbols(x)
    assert sym.dtype == np.uint8 and np.array_equal(ck.symbol_widths(sym), width)
    offsets = np.cumsum(width) - width
    buf = ck.pack_bits(raw, width, offsets, int((width.sum() + 7) // 8))
    assert np.array_equal(ck.symbols_to_int(sym, ck.unpack_bits(buf, width, offsets)), x)


def test_bad_records_are_refused_with_names(records_large_vocab):
    rec = records_large_vocab[0]
    with pytest.raises(ValueError, match="prompt_id='p00000'.*topk_ids"):
        encode_records([rec], "compact", 16, 5000)
    bad = dataclasses.replace(rec, topk_ids=rec.topk_ids.copy())
    bad.topk_ids[0, 0] = 7000
    with pytest.raises(ValueError, match="outside the vocabulary"):
        encode_records([bad], "plain", 32, 5000)
    dup = dataclasses.replace(rec, topk_ids=rec.topk_ids.copy(), topk_logprobs=rec.topk_logprobs.copy())
    dup.topk_ids[0, 5], dup.topk_logprobs[0, 5] = dup.topk_ids[0, 6], dup.topk_logprobs[0, 6]
    with pytest.raises(ValueError, match="repeats"):
        encode_records([dup], "compact", 32, 5000)
    with pytest.raises(ValueError, match="unknown codec"):
        encode_records([rec], "zip", 32, 5000)


def test_decode_needs_codec_metadata(records_large_vocab):
    table = encode_records(records_large_vocab, "plain", 32, 5000).replace_schema_metadata(None)
    with pytest.raises(ValueError, match="lopd.codec"):
        decode_table(table)


def test_tail_logprob_is_stable_and_clamped():
    # top-k holding all but 1e-12 of the mass: naive log(1 - sum) loses it in float32 rounding
    lp = np.log(np.array([[0.5, 0.5 - 1e-12]]))
    assert compute_tail_logprob(lp)[0] == pytest.approx(np.log(1e-12), abs=1e-3)
    assert compute_tail_logprob(np.log(np.array([[0.6, 0.5]])))[0] == np.float32(TAIL_LOGPROB_FLOOR)  # sum > 1
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 30)) * 3
    full = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    top = -np.sort(-full, axis=1)[:, :8]
    reference = np.log(np.exp(-np.sort(-full, axis=1)[:, 8:]).sum(axis=1))
    assert np.allclose(compute_tail_logprob(top), np.maximum(reference, TAIL_LOGPROB_FLOOR), atol=1e-4)


def test_table_columns_are_plain_arrow_types(records_large_vocab):
    table = encode_records(records_large_vocab, "compact", 32, 5000)
    assert table.schema.field("token_ids").type == pa.list_(pa.int32())
    assert table.schema.field("teacher_logprobs").type == pa.list_(pa.float32())
    assert table.schema.field("reward").type == pa.float32()
    assert table["num_response_tokens"].to_pylist() == [r.num_response_tokens for r in records_large_vocab]


def test_storage_imports_no_model_libraries():
    import subprocess
    import sys

    code = (
        "import sys, storage, storage.bench, storage.inspect, storage.reader, storage.synthetic\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'prefect')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("codec", ["plain", "compact"])
def test_decoding_in_slices_equals_decoding_at_once(records_large_vocab, codec, monkeypatch):
    import storage.codecs as codecs_mod

    table = encode_records(records_large_vocab, codec, 32, 5000)
    whole = decode_table(table)
    monkeypatch.setattr(codecs_mod, "DECODE_CHUNK_ENTRIES", 2 * 40 * 32)  # two rollouts per slice
    sliced = decode_table(table.slice(1))  # a sliced table, as a row group read back can be
    for a, b in zip(whole[1:], sliced, strict=True):
        assert np.array_equal(a.topk_ids, b.topk_ids) and np.array_equal(a.topk_logprobs, b.topk_logprobs)
        assert np.array_equal(a.tail_logprob, b.tail_logprob) and np.array_equal(a.token_ids, b.token_ids)


def test_compact_corrupt_columns_are_refused(records_large_vocab):
    table = encode_records(records_large_vocab[:3], "compact", 32, 5000)
    for name in ("ck_runs", "ck_runx", "ck_bits", "ck_gap1"):
        values = table[name].to_pylist()
        values[1] = values[1][:-1]  # drop the last byte of one row
        with pytest.raises(ValueError, match="corrupt"):
            decode_table(table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.binary())))


@pytest.mark.parametrize("codec,grid", [("plain", None), ("compact", "fine"), ("compact", "lean")])
def test_topk_ids_in_padded_output_rows_round_trip(codec, grid):
    """The vocabulary is the model's output size, which can exceed the tokenizer (Qwen3: 151,936 rows for
    151,669 tokens); top-k ids in the padded rows, the last row included, are ordinary ids to every codec."""
    from storage.codecs import codec_params

    tokenizer_size, vocab, k = 300, 320, 8
    recs = make_records(tokenizer_size, k, num_rollouts=3, response_len=20, seed=5)
    for r in recs:
        t = np.arange(r.topk_ids.shape[0])
        r.topk_ids[:, 1] = vocab - 1  # distinct from the others (all < tokenizer_size)
        r.topk_ids[:, 3] = tokenizer_size + t % 19
    params = codec_params(codec, grid)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        encode_records(recs, codec, k, tokenizer_size, **params)
    out = decode_table(encode_records(recs, codec, k, vocab, **params))
    for a, b in zip(recs, out, strict=True):
        _assert_common_exact(a, b)
        assert np.array_equal(np.sort(a.topk_ids, 1), np.sort(b.topk_ids, 1))
        assert (b.topk_ids >= tokenizer_size).sum() == 2 * len(b.topk_ids)
        if codec == "plain":
            assert np.array_equal(a.topk_ids, b.topk_ids)


@pytest.mark.parametrize("codec", ["plain", "compact"])
def test_k0_tables_have_no_topk_columns_and_round_trip(codec, tmp_path):
    """k = 0 (Lightning-only): only the common columns; records come back with [R, 0] top-k arrays. A k > 0
    table decoded with topk=False from just decode_columns (a Parquet column selection) gives the same."""
    import pyarrow.parquet as pq

    from storage.codecs import TOPK_COLUMNS, decode_columns

    recs = make_records(300, 4, num_rollouts=4, response_len=12, seed=2)
    k0 = [dataclasses.replace(r, topk_ids=r.topk_ids[:, :0], topk_logprobs=r.topk_logprobs[:, :0],
                              tail_logprob=compute_tail_logprob(r.topk_logprobs[:, :0])) for r in recs]
    table = encode_records(k0, codec, 0, 300)
    assert not set(TOPK_COLUMNS[codec]) & set(table.column_names)
    assert table.nbytes < encode_records(recs, codec, 4, 300).nbytes
    out = decode_table(table)
    for a, b in zip(k0, out, strict=True):
        _assert_common_exact(a, b)
        assert b.topk_ids.shape == (a.num_response_tokens, 0) and b.topk_ids.dtype == np.int32
        assert b.topk_logprobs.shape == (a.num_response_tokens, 0) and not b.tail_logprob.any()
    pq.write_table(encode_records(recs, codec, 4, 300), tmp_path / "k4.parquet")
    f = pq.ParquetFile(tmp_path / "k4.parquet")
    slim = f.read_row_group(0, columns=decode_columns(f.schema_arrow, topk=False))
    assert not set(TOPK_COLUMNS[codec]) & set(slim.column_names)
    for a, b in zip(out, decode_table(slim, topk=False), strict=True):
        _assert_common_exact(a, b)
        assert b.topk_ids.shape == a.topk_ids.shape and b.topk_logprobs.shape == a.topk_logprobs.shape
