"""Top-k codecs: `TeacherRecord`s <-> one Arrow table row per rollout.

`plain` stores the top-k as Arrow lists (ids int32, log-probs float16) in the teacher's order.
`compact` stores them in binary columns (see storage/compact.py and storage/SCHEMA.md).
Both store the sampled-token teacher and behaviour log-probs exactly (float32). With ``k = 0``
(Lightning-only shards) neither writes top-k columns: the records decode with top-k arrays of shape
[R, 0] and a tail log-prob of 0 (all the mass outside an empty top-k).

The codec, k, vocab_size and parameters travel in the table's schema metadata (key `lopd.codec`),
which ShardSet keeps in each Parquet file: `decode_table` needs nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from storage import compact as ck
from storage.records import TAIL_LOGPROB_FLOOR, TeacherRecord

CODECS = ("plain", "compact")
# Byte layout version per codec, recorded in `lopd.codec`. compact 2: codes coded run by run
# (ck_runs, ck_runx replace ck_first, ck_runs, ck_steps of version 1), tail code relative to the last entry's.
CODEC_VERSIONS = {"plain": 1, "compact": 2}
KV_CODEC = b"lopd.codec"
GAP_COLUMNS = tuple(f"ck_gap{c}" for c in range(ck.GAP_CONTEXTS))
COMPACT_COLUMNS = ("ck_runs", "ck_runx", "ck_sampled", "ck_tail", "ck_abs", *GAP_COLUMNS, "ck_bits")
PLAIN_COLUMNS = ("tail_logprob", "topk_ids", "topk_logprobs")
TOPK_COLUMNS = {"plain": PLAIN_COLUMNS, "compact": COMPACT_COLUMNS}
DECODE_CHUNK_ENTRIES = 1 << 18


def codec_params(codec: str, grid: str | None = None) -> dict[str, float]:
    """Parameters of a named quantisation grid of ``codec`` (compact: ``fine``, the default, or ``lean``)."""
    if codec != "compact":
        if grid not in (None, "fine"):
            raise ValueError(f"codec {codec} has no quantisation grid (got grid={grid!r})")
        return {}
    if grid is None:
        return {}
    if grid not in ck.GRIDS:
        raise ValueError(f"compact codec: unknown grid {grid!r}; choose one of {', '.join(ck.GRIDS)}")
    return ck.GRIDS[grid].to_dict()


def codec_info(codec: str, k: int, vocab_size: int, **params: float) -> dict:
    """The JSON description of a codec setting; put it in the ShardSet metadata so resume checks it."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")
    if k < 0 or vocab_size < 1 or k > vocab_size:
        raise ValueError(f"codec {codec}: need 0 <= k ({k}) <= vocab_size ({vocab_size})")
    if codec == "plain" and params:
        raise ValueError(f"codec plain takes no parameters, got {sorted(params)}")
    if codec == "compact":
        try:
            params = ck.CompactParams(**params).to_dict()
        except TypeError as err:
            raise ValueError(f"codec compact: {err}; parameters are {list(ck.CompactParams().to_dict())}") from err
    return {"codec": codec, "codec_version": CODEC_VERSIONS[codec], "k": k, "vocab_size": vocab_size, "params": params}


def table_codec_info(table_or_schema: pa.Table | pa.Schema) -> dict:
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    raw = (schema.metadata or {}).get(KV_CODEC)
    if raw is None:
        raise ValueError("table has no 'lopd.codec' schema metadata: it was not written by "
                         "storage.codecs.encode_records")
    return json.loads(raw)


# ------------------------------------------------------------------ helpers
def _list_array(parts: Sequence[np.ndarray], value_type: pa.DataType) -> pa.Array:
    lengths = np.fromiter((p.shape[0] for p in parts), dtype=np.int64, count=len(parts))
    offsets = np.zeros(len(parts) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(parts) if parts else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets),
                                    pa.array(values.astype(value_type.to_pandas_dtype(), copy=False)))


def _binary_array(data: np.ndarray, offsets: np.ndarray) -> pa.Array:
    if offsets[-1] >= 2**31:
        raise ValueError("a compact column exceeds 2 GiB in one table: encode fewer records per table")
    buffers = [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(np.ascontiguousarray(data).view(np.uint8))]
    return pa.BinaryArray.from_buffers(pa.binary(), len(offsets) - 1, buffers)


def _binary_parts(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [rows + 1] starting at 0, bytes) of a binary column."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return offsets - offsets[0], data[offsets[0] : offsets[-1]]


def _list_parts(column: pa.ChunkedArray | pa.Array, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [rows + 1] starting at 0, flat values) of a list column."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return offsets - offsets[0], values[offsets[0] : offsets[-1]]


def _row_offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


# ------------------------------------------------------------------ encode
def encode_records(records: Sequence[TeacherRecord], codec: str, k: int, vocab_size: int, **params: float) -> pa.Table:
    """Encode rollouts into one table row each (see module docstring). Raises ValueError on bad records."""
    info = codec_info(codec, k, vocab_size, **params)
    for record in records:
        record.check(k, vocab_size)
    columns = _common_columns(records)
    if k == 0:
        pass  # Lightning-only: the sampled-token log-probs are all there is
    elif codec == "plain":
        columns.update(_plain_columns(records))
    else:
        columns.update(_compact_columns(records, k, ck.CompactParams(**info["params"])))
    table = pa.table(columns)
    return table.replace_schema_metadata({KV_CODEC: json.dumps(info, sort_keys=True).encode()})


def _common_columns(records: Sequence[TeacherRecord]) -> dict[str, pa.Array]:
    return {
        "prompt_id": pa.array([r.prompt_id for r in records], pa.string()),
        "sample_index": pa.array([r.sample_index for r in records], pa.int32()),
        "token_ids": _list_array([r.token_ids for r in records], pa.int32()),
        "prompt_len": pa.array([r.prompt_len for r in records], pa.int32()),
        "num_response_tokens": pa.array([r.num_response_tokens for r in records], pa.int32()),
        "teacher_logprobs": _list_array([r.teacher_logprobs for r in records], pa.float32()),
        "behavior_logprobs": _list_array([r.behavior_logprobs for r in records], pa.float32()),
        "reward": pa.array([r.reward for r in records], pa.float32()),
    }


def _plain_columns(records: Sequence[TeacherRecord]) -> dict[str, pa.Array]:
    return {
        "tail_logprob": _list_array([r.tail_logprob for r in records], pa.float32()),
        "topk_ids": _list_array([r.topk_ids.ravel() for r in records], pa.int32()),
        "topk_logprobs": _list_array([r.topk_logprobs.ravel() for r in records], pa.float16()),
    }


def _flatten(records: Sequence[TeacherRecord], k: int) -> dict[str, np.ndarray]:
    """All positions of all records stacked: ids/lp [T, K], sampled/tail/row [T], pos_off [rows + 1]."""
    positions = np.array([r.num_response_tokens for r in records], dtype=np.int64)
    t = int(positions.sum())

    def stack(name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
        if not t:
            return np.zeros(shape, dtype)
        return np.concatenate([getattr(r, name) for r in records]).astype(dtype).reshape(shape)

    return {
        "ids": stack("topk_ids", np.int64, (t, k)),
        "lp": stack("topk_logprobs", np.float32, (t, k)),
        "sampled": stack("response_ids", np.int64, (t,)),
        "tail": stack("tail_logprob", np.float32, (t,)),
        "pos_off": _row_offsets(positions),
        "row": np.repeat(np.arange(len(records)), positions),
    }


def _compact_columns(records: Sequence[TeacherRecord], k: int, params: ck.CompactParams) -> dict[str, pa.Array]:
    flat = _flatten(records, k)
    pos_off, row_of_pos, n_rows = flat["pos_off"], flat["row"], len(records)
    codes = ck.quantize_logprobs(flat["lp"], params)
    order = ck.canonical_order(flat["ids"], codes)
    ids = np.take_along_axis(flat["ids"], order, axis=1)
    codes = np.take_along_axis(codes, order, axis=1)
    run_byte, run_first, extra, extra_run = ck.encode_runs(codes)
    run_row = row_of_pos[run_first // k]
    extra_sym, extra_width, extra_raw = ck.int_to_symbols(extra)
    tail = ck.quantize_logprobs(flat["tail"], params)
    columns = {
        "ck_runs": _binary_array(run_byte, _row_offsets(np.bincount(run_row, minlength=n_rows))),
        "ck_runx": _binary_array(extra_sym, _row_offsets(np.bincount(run_row[extra_run], minlength=n_rows))),
        # the tail code relative to the last (smallest) top-k entry's code, mod 256
        "ck_tail": _binary_array(((tail.astype(np.int64) - codes[:, -1]) & 255).astype(np.uint8), pos_off),
    }
    return columns | _id_columns(records, ids, codes, flat["sampled"], pos_off, row_of_pos,
                                 (extra_raw, extra_width, run_row[extra_run]))


def _id_columns(records: Sequence[TeacherRecord], ids: np.ndarray, codes: np.ndarray, sampled: np.ndarray,
                pos_off: np.ndarray, row_of_pos: np.ndarray,
                run_bits: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, pa.Array]:
    """ck_sampled, ck_abs, ck_gap*, ck_bits from canonically ordered ids [T, K] (see SCHEMA.md).
    run_bits = (raw, width, row) of the ck_runx symbols, whose raw bits open each row of ck_bits."""
    k, n_rows = ids.shape[1], len(records)
    start, ctx = ck.run_structure(codes)
    is_sampled = ids == sampled[:, None]
    sampled_index = np.where(is_sampled.any(axis=1), is_sampled.argmax(axis=1), k)
    prev = np.zeros_like(ids)
    prev[:, 1:] = ids[:, :-1]
    value = np.where(start, ids, ids - prev - 1)
    if (value < 0).any():
        record = records[int(row_of_pos[np.flatnonzero((value < 0).any(axis=1))[0]])]
        raise ValueError(f"record prompt_id={record.prompt_id!r} sample_index={record.sample_index}: a top-k id "
                         "repeats within one position")
    coded = ~is_sampled
    sym, width, raw = ck.int_to_symbols(value[coded])
    entry_row = np.broadcast_to(row_of_pos[:, None], ids.shape)[coded]
    dtype = np.dtype(_sampled_dtype(k))
    columns = {"ck_sampled": _binary_array(sampled_index.astype(dtype), pos_off * dtype.itemsize)}
    for name, mask in _symbol_streams(start, ctx, coded).items():
        mask = mask[coded]
        columns[name] = _binary_array(sym[mask], _row_offsets(np.bincount(entry_row[mask], minlength=n_rows)))
    # each row of ck_bits: the raw bits of its ck_runx symbols, then those of its id symbols
    columns["ck_bits"] = _pack_row_bits([run_bits, (raw, width, entry_row)], n_rows)
    return columns


def _symbol_streams(start: np.ndarray, ctx: np.ndarray, coded: np.ndarray) -> dict[str, np.ndarray]:
    """Which entries [T, K] each symbol column holds: run starts in ck_abs, gaps by run context."""
    return {"ck_abs": start & coded} | {name: ~start & coded & (ctx == c) for c, name in enumerate(GAP_COLUMNS)}


def _sampled_dtype(k: int) -> str:
    return "u1" if k < 255 else "<u2"


def _pack_row_bits(groups: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], n_rows: int) -> pa.Array:
    """Bit fields (raw, width, row; rows non-decreasing within a group), each row holding its fields of
    the first group, then those of the next, ..., padded to a whole byte."""
    row_bits = [np.bincount(row, weights=width, minlength=n_rows).astype(np.int64) for _, width, row in groups]
    byte_off = _row_offsets((sum(row_bits) + 7) // 8)
    start_bit = byte_off[:-1] * 8
    packed = np.zeros(int(byte_off[-1]), dtype=np.uint8)
    for (raw, width, row), bits in zip(groups, row_bits):
        offsets, _ = _row_fields(width, row, n_rows, start_bit)
        packed |= ck.pack_bits(raw, width, offsets, packed.size)  # the groups' bits do not overlap
        start_bit = start_bit + bits
    return _binary_array(packed, byte_off)


def _row_fields(width: np.ndarray, entry_row: np.ndarray, n_rows: int,
                row_start_bit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bit offsets of consecutive fields per row (entry_row non-decreasing), each row's first field at
    row_start_bit[row]; and the bits per row."""
    row_bits = np.bincount(entry_row, weights=width, minlength=n_rows).astype(np.int64)
    within = np.cumsum(width) - width - _row_offsets(row_bits)[entry_row]
    return row_start_bit[entry_row] + within, row_bits


# ------------------------------------------------------------------ decode
def decode_columns(schema: pa.Schema, topk: bool = True) -> list[str]:
    """The columns ``decode_table(..., topk=topk)`` reads: pass them to a Parquet read to skip the top-k
    columns' I/O and decompression when no loss needs them."""
    codec = table_codec_info(schema)["codec"]
    return [name for name in schema.names if topk or name not in TOPK_COLUMNS[codec]]


def decode_table(table: pa.Table, topk: bool = True) -> list[TeacherRecord]:
    """Rows of a table written by encode_records (or a row group of a shard) -> TeacherRecords.
    ``topk=False`` skips the top-k columns (they may be absent from ``table``): the records then hold top-k
    arrays of shape [R, 0] and a zero tail, as a ``k = 0`` shard's do."""
    info = table_codec_info(table)
    _check_codec_version(info)
    k = int(info["k"]) if topk else 0
    # Slices of about DECODE_CHUNK_ENTRIES top-k entries bound the decoder's temporaries.
    entries = table["num_response_tokens"].to_numpy().astype(np.int64) * k
    records: list[TeacherRecord] = []
    start = 0
    while start < table.num_rows:
        stop = start + max(1, int(np.searchsorted(np.cumsum(entries[start:]), DECODE_CHUNK_ENTRIES, side="right")))
        records += _decode_rows(table.slice(start, stop - start), info, k)
        start = stop
    return records


def _check_codec_version(info: dict) -> None:
    codec, version = info.get("codec"), info.get("codec_version")
    if codec not in CODECS:
        raise ValueError(f"unsupported codec {codec!r}: this lopd reads {', '.join(CODECS)}")
    if version != CODEC_VERSIONS[codec]:
        older = isinstance(version, int) and version < CODEC_VERSIONS[codec]
        raise ValueError(
            f"codec {codec!r} version {version}: this lopd reads version {CODEC_VERSIONS[codec]} only; "
            + ("the shard was written by an older lopd (re-encode it, or read it with that lopd)" if older
               else "upgrade lopd")
        )


def _decode_rows(table: pa.Table, info: dict, k: int) -> list[TeacherRecord]:
    tok_off, tokens = _list_parts(table["token_ids"], np.int32)
    prompt_len = table["prompt_len"].to_numpy().astype(np.int64)
    positions = table["num_response_tokens"].to_numpy().astype(np.int64)
    pos_off = _row_offsets(positions)
    if k == 0:  # a k = 0 shard, or the top-k not wanted
        t = int(pos_off[-1])
        ids, lp, tail = np.zeros((t, 0), np.int32), np.zeros((t, 0), np.float32), np.zeros(t, np.float32)
    elif info["codec"] == "plain":
        ids, lp, tail = _decode_plain(table, k)
    else:
        sampled = tokens[_response_index(tok_off, prompt_len, positions)].astype(np.int64)
        ids, lp, tail = _decode_compact(table, k, ck.CompactParams(**info["params"]), pos_off, sampled)
    _, teacher = _list_parts(table["teacher_logprobs"], np.float32)
    _, behavior = _list_parts(table["behavior_logprobs"], np.float32)
    prompt_ids = table["prompt_id"].to_pylist()
    sample_index = table["sample_index"].to_pylist()
    rewards = table["reward"].to_pylist()
    records = []
    for i in range(table.num_rows):
        a, b = int(pos_off[i]), int(pos_off[i + 1])
        records.append(
            TeacherRecord(
                prompt_id=prompt_ids[i],
                sample_index=sample_index[i],
                token_ids=tokens[tok_off[i] : tok_off[i + 1]],
                prompt_len=int(prompt_len[i]),
                teacher_logprobs=teacher[a:b],
                behavior_logprobs=behavior[a:b],
                topk_ids=ids[a:b],
                topk_logprobs=lp[a:b],
                tail_logprob=tail[a:b],
                reward=rewards[i],
            )
        )
    return records


def _response_index(tok_off: np.ndarray, prompt_len: np.ndarray, positions: np.ndarray) -> np.ndarray:
    starts = tok_off[:-1] + prompt_len
    within = np.arange(int(positions.sum())) - np.repeat(_row_offsets(positions)[:-1], positions)
    return np.repeat(starts, positions) + within


def _decode_plain(table: pa.Table, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    _, ids = _list_parts(table["topk_ids"], np.int32)
    _, lp = _list_parts(table["topk_logprobs"], np.float16)
    _, tail = _list_parts(table["tail_logprob"], np.float32)
    return ids.reshape(-1, k), lp.astype(np.float32).reshape(-1, k), tail


def _decode_compact(
    table: pa.Table, k: int, params: ck.CompactParams, pos_off: np.ndarray, sampled: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bits_off, bits = _binary_parts(table["ck_bits"])
    codes, run_bits = _decode_codes(table, k, params, pos_off, bits_off, bits)
    ids = _decode_ids(table, codes, pos_off, sampled, bits_off, bits, run_bits)
    lp = ck.dequantize_logprobs(codes, params)
    tail_code = (_binary_parts(table["ck_tail"])[1].astype(np.int64) + codes[:, -1]) & 255
    if tail_code.size and tail_code.max() > params.max_code:
        raise ValueError("compact codec: tail codes out of range (corrupt data)")
    tail = ck.dequantize_logprobs(tail_code, params)
    return ids, lp, np.maximum(tail, np.float32(TAIL_LOGPROB_FLOOR))


def _decode_codes(table: pa.Table, k: int, params: ck.CompactParams, pos_off: np.ndarray, bits_off: np.ndarray,
                  bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-prob codes [T, K] in canonical order from ck_runs, ck_runx (and the start of each ck_bits row);
    also the bits per row those ck_runx symbols take in ck_bits."""
    n_rows = len(pos_off) - 1
    run_off, run_byte = _binary_parts(table["ck_runs"])
    extra_off, extra_sym = _binary_parts(table["ck_runx"])
    run_row = np.repeat(np.arange(n_rows), np.diff(run_off))
    counts = ck.run_extra_counts(run_byte)
    if not np.array_equal(np.bincount(run_row, weights=counts, minlength=n_rows).astype(np.int64), np.diff(extra_off)):
        raise ValueError("compact codec: column ck_runx does not hold the values ck_runs announces (corrupt data)")
    extra_row = np.repeat(run_row, counts)
    width = ck.symbol_widths(extra_sym)
    offsets, run_bits = _row_fields(width, extra_row, n_rows, bits_off[:-1] * 8)
    if (run_bits > np.diff(bits_off) * 8).any():
        raise ValueError("compact codec: column ck_bits is too short for its rows (corrupt data)")
    extra = ck.symbols_to_int(extra_sym, ck.unpack_bits(bits, width, offsets))
    codes, length = ck.decode_runs(run_byte, extra, int(pos_off[-1]), k, params.max_code)
    if not np.array_equal(np.bincount(run_row, weights=length, minlength=n_rows).astype(np.int64),
                          np.diff(pos_off) * k):
        raise ValueError("compact codec: the runs of a ck_runs row do not cover its positions (corrupt data)")
    return codes, run_bits


def _decode_ids(table: pa.Table, codes: np.ndarray, pos_off: np.ndarray, sampled: np.ndarray, bits_off: np.ndarray,
                bits: np.ndarray, run_bits: np.ndarray) -> np.ndarray:
    t, k = codes.shape
    start, ctx = ck.run_structure(codes)
    sampled_index = np.frombuffer(_binary_parts(table["ck_sampled"])[1].tobytes(),
                                  dtype=_sampled_dtype(k)).astype(np.int64)
    is_sampled = np.arange(k)[None, :] == sampled_index[:, None]
    coded = ~is_sampled
    sym = np.zeros((t, k), dtype=np.uint8)
    for name, mask in _symbol_streams(start, ctx, coded).items():
        stream = _binary_parts(table[name])[1]
        if stream.size != int(mask.sum()):
            raise ValueError(f"compact codec: column {name} holds {stream.size} symbols, the structure needs "
                             f"{int(mask.sum())} (corrupt data)")
        sym[mask] = stream
    coded_sym = sym[coded]
    row_of_pos = np.repeat(np.arange(len(pos_off) - 1), np.diff(pos_off))
    entry_row = np.broadcast_to(row_of_pos[:, None], (t, k))[coded]
    width = ck.symbol_widths(coded_sym)
    n_rows = len(pos_off) - 1
    offsets, id_bits = _row_fields(width, entry_row, n_rows, bits_off[:-1] * 8 + run_bits)
    if not np.array_equal((run_bits + id_bits + 7) // 8, np.diff(bits_off)):
        raise ValueError("compact codec: column ck_bits has the wrong length for its rows (corrupt data)")
    value = ck.symbols_to_int(coded_sym, ck.unpack_bits(bits, width, offsets))
    # Run starts are whole ids, other entries gaps (+1) from the previous id, and the sampled entry
    # restarts the running sum from the sampled token: a cumulative sum restarted at each segment.
    base = np.zeros((t, k), dtype=np.int64)
    base[coded] = value + np.where(start[coded], 0, 1)
    base[is_sampled] = np.repeat(sampled, is_sampled.sum(axis=1))
    flat = base.ravel()
    csum = np.cumsum(flat)
    seg = np.maximum.accumulate(np.where((start | is_sampled).ravel(), np.arange(flat.size), 0))
    return (csum - csum[seg] + flat[seg]).reshape(t, k).astype(np.int32)
