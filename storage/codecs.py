"""Top-k codecs: `TeacherRecord`s <-> one Arrow table row per rollout.

`plain` stores the top-k as Arrow lists (ids int32, log-probs float16) in the teacher's order.
`compact` stores them in binary columns (see storage/compact.py and storage/SCHEMA.md).
Both store the sampled-token teacher and behaviour log-probs exactly (float32).

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
CODEC_VERSION = 1
KV_CODEC = b"lopd.codec"
GAP_COLUMNS = tuple(f"ck_gap{c}" for c in range(ck.GAP_CONTEXTS))
COMPACT_COLUMNS = ("ck_first", "ck_runs", "ck_steps", "ck_sampled", "ck_tail", "ck_abs", *GAP_COLUMNS, "ck_bits")
PLAIN_COLUMNS = ("tail_logprob", "topk_ids", "topk_logprobs")
TOPK_COLUMNS = {"plain": PLAIN_COLUMNS, "compact": COMPACT_COLUMNS}
DECODE_CHUNK_ENTRIES = 1 << 18


def codec_info(codec: str, k: int, vocab_size: int, **params: float) -> dict:
    """The JSON description of a codec setting; put it in the ShardSet metadata so resume checks it."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")
    if k < 1 or vocab_size < 1 or k > vocab_size:
        raise ValueError(f"codec {codec}: need 1 <= k ({k}) <= vocab_size ({vocab_size})")
    if codec == "plain" and params:
        raise ValueError(f"codec plain takes no parameters, got {sorted(params)}")
    if codec == "compact":
        try:
            params = ck.CompactParams(**params).to_dict()
        except TypeError as err:
            raise ValueError(f"codec compact: {err}; parameters are {list(ck.CompactParams().to_dict())}") from err
    return {"codec": codec, "codec_version": CODEC_VERSION, "k": k, "vocab_size": vocab_size, "params": params}


def table_codec_info(table_or_schema: pa.Table | pa.Schema) -> dict:
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    raw = (schema.metadata or {}).get(KV_CODEC)
    if raw is None:
        raise ValueError("table has no 'lopd.codec' schema metadata: it was not written by storage.codecs.encode_records")
    return json.loads(raw)


# ------------------------------------------------------------------ helpers
def _list_array(parts: Sequence[np.ndarray], value_type: pa.DataType) -> pa.Array:
    lengths = np.fromiter((p.shape[0] for p in parts), dtype=np.int64, count=len(parts))
    offsets = np.zeros(len(parts) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(parts) if parts else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(value_type.to_pandas_dtype(), copy=False)))


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
    if codec == "plain":
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
    step = np.diff(codes.astype(np.int16), axis=1)
    new_run = step != 0
    columns = {
        "ck_first": _binary_array(codes[:, 0], pos_off),
        "ck_runs": _pack_row_flags(new_run, pos_off),
        "ck_steps": _binary_array((step[new_run] - 1).astype(np.uint8), _row_offsets(_per_row(row_of_pos, new_run.sum(axis=1), n_rows))),
        "ck_tail": _binary_array(ck.quantize_logprobs(flat["tail"], params), pos_off),
    }
    return columns | _id_columns(records, ids, codes, flat["sampled"], pos_off, row_of_pos)


def _per_row(row: np.ndarray, counts: np.ndarray, n_rows: int) -> np.ndarray:
    return np.bincount(row, weights=counts, minlength=n_rows).astype(np.int64)


def _id_columns(records: Sequence[TeacherRecord], ids: np.ndarray, codes: np.ndarray, sampled: np.ndarray,
                pos_off: np.ndarray, row_of_pos: np.ndarray) -> dict[str, pa.Array]:
    """ck_sampled, ck_abs, ck_gap*, ck_bits from canonically ordered ids [T, K] (see SCHEMA.md)."""
    k, n_rows = ids.shape[1], len(records)
    start, ctx = ck.run_structure(codes)
    is_sampled = ids == sampled[:, None]
    sampled_index = np.where(is_sampled.any(axis=1), is_sampled.argmax(axis=1), k)
    prev = np.zeros_like(ids)
    prev[:, 1:] = ids[:, :-1]
    value = np.where(start, ids, ids - prev - 1)
    if (value < 0).any():
        record = records[int(row_of_pos[np.flatnonzero((value < 0).any(axis=1))[0]])]
        raise ValueError(f"record prompt_id={record.prompt_id!r} sample_index={record.sample_index}: a top-k id repeats within one position")
    coded = ~is_sampled
    sym, width, raw = ck.int_to_symbols(value[coded])
    entry_row = np.broadcast_to(row_of_pos[:, None], ids.shape)[coded]
    dtype = np.dtype(_sampled_dtype(k))
    columns = {"ck_sampled": _binary_array(sampled_index.astype(dtype), pos_off * dtype.itemsize)}
    for name, mask in _symbol_streams(start, ctx, coded).items():
        mask = mask[coded]
        columns[name] = _binary_array(sym[mask], _row_offsets(np.bincount(entry_row[mask], minlength=n_rows)))
    columns["ck_bits"] = _pack_row_bits(raw, width, entry_row, n_rows)
    return columns


def _symbol_streams(start: np.ndarray, ctx: np.ndarray, coded: np.ndarray) -> dict[str, np.ndarray]:
    """Which entries [T, K] each symbol column holds: run starts in ck_abs, gaps by run context."""
    return {"ck_abs": start & coded} | {name: ~start & coded & (ctx == c) for c, name in enumerate(GAP_COLUMNS)}


def _sampled_dtype(k: int) -> str:
    return "u1" if k < 255 else "<u2"


def _pack_row_bits(raw: np.ndarray, width: np.ndarray, entry_row: np.ndarray, n_rows: int) -> pa.Array:
    row_bits = np.bincount(entry_row, weights=width, minlength=n_rows).astype(np.int64)
    byte_off = _row_offsets((row_bits + 7) // 8)
    within = np.cumsum(width) - width
    within -= _row_offsets(row_bits)[entry_row]
    packed = ck.pack_bits(raw, width, byte_off[entry_row] * 8 + within, int(byte_off[-1]))
    return _binary_array(packed, byte_off)


def _pack_row_flags(flags_T_J: np.ndarray, pos_off: np.ndarray) -> pa.Array:
    """One bit per entry (LSB first), each row padded to whole bytes."""
    row_bits = np.diff(pos_off) * flags_T_J.shape[1]
    byte_off = _row_offsets((row_bits + 7) // 8)
    padded = np.zeros(int(byte_off[-1]) * 8, dtype=bool)
    row_of_bit = np.repeat(np.arange(len(row_bits)), row_bits)
    padded[np.arange(flags_T_J.size) - _row_offsets(row_bits)[row_of_bit] + byte_off[row_of_bit] * 8] = flags_T_J.ravel()
    return _binary_array(np.packbits(padded, bitorder="little"), byte_off)


def _unpack_row_flags(column: pa.ChunkedArray, pos_off: np.ndarray, per_position: int) -> np.ndarray:
    byte_off, data = _binary_parts(column)
    row_bits = np.diff(pos_off) * per_position
    if ((row_bits + 7) // 8 != np.diff(byte_off)).any():
        raise ValueError("compact codec: column ck_runs has the wrong length for its rows (corrupt data)")
    bits = np.unpackbits(data, bitorder="little").astype(bool)
    row_of_bit = np.repeat(np.arange(len(row_bits)), row_bits)
    return bits[np.arange(int(row_bits.sum())) - _row_offsets(row_bits)[row_of_bit] + byte_off[row_of_bit] * 8]


def _unpack_row_bits(column: pa.ChunkedArray, width: np.ndarray, entry_row: np.ndarray) -> np.ndarray:
    """Inverse of _pack_row_bits: each row's fields start on a byte boundary."""
    byte_off, data = _binary_parts(column)
    n_rows = len(byte_off) - 1
    row_bits = np.bincount(entry_row, weights=width, minlength=n_rows).astype(np.int64)
    if ((row_bits + 7) // 8 != np.diff(byte_off)).any():
        raise ValueError("compact codec: a packed-bit column has the wrong length for its row (corrupt data)")
    within = np.cumsum(width) - width - _row_offsets(row_bits)[entry_row]
    return ck.unpack_bits(data, width, byte_off[entry_row] * 8 + within)


# ------------------------------------------------------------------ decode
def decode_table(table: pa.Table) -> list[TeacherRecord]:
    """Rows of a table written by encode_records (or a row group of a shard) -> TeacherRecords."""
    info = table_codec_info(table)
    if info["codec"] not in CODECS or info.get("codec_version") != CODEC_VERSION:
        raise ValueError(f"unsupported codec {info['codec']!r} version {info.get('codec_version')}: upgrade lopd")
    # Slices of about DECODE_CHUNK_ENTRIES top-k entries bound the decoder's temporaries.
    entries = table["num_response_tokens"].to_numpy().astype(np.int64) * int(info["k"])
    records: list[TeacherRecord] = []
    start = 0
    while start < table.num_rows:
        stop = start + max(1, int(np.searchsorted(np.cumsum(entries[start:]), DECODE_CHUNK_ENTRIES, side="right")))
        records += _decode_rows(table.slice(start, stop - start), info)
        start = stop
    return records


def _decode_rows(table: pa.Table, info: dict) -> list[TeacherRecord]:
    k = int(info["k"])
    tok_off, tokens = _list_parts(table["token_ids"], np.int32)
    prompt_len = table["prompt_len"].to_numpy().astype(np.int64)
    positions = table["num_response_tokens"].to_numpy().astype(np.int64)
    pos_off = _row_offsets(positions)
    if info["codec"] == "plain":
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
    codes = _decode_codes(table, k, params, pos_off)
    ids = _decode_ids(table, codes, pos_off, sampled)
    lp = ck.dequantize_logprobs(codes, params)
    tail = ck.dequantize_logprobs(_binary_parts(table["ck_tail"])[1], params)
    return ids, lp, np.maximum(tail, np.float32(TAIL_LOGPROB_FLOOR))


def _decode_codes(table: pa.Table, k: int, params: ck.CompactParams, pos_off: np.ndarray) -> np.ndarray:
    """Log-prob codes [T, K] in canonical order from ck_first, ck_runs, ck_steps."""
    t = int(pos_off[-1])
    new_run = _unpack_row_flags(table["ck_runs"], pos_off, k - 1)
    steps = _binary_parts(table["ck_steps"])[1]
    if steps.size != int(new_run.sum()):
        raise ValueError(f"compact codec: column ck_steps holds {steps.size} values, ck_runs flags {int(new_run.sum())} (corrupt data)")
    step = np.zeros(t * (k - 1), dtype=np.int64)
    step[new_run] = steps.astype(np.int64) + 1
    codes = np.empty((t, k), dtype=np.int64)
    codes[:, 0] = _binary_parts(table["ck_first"])[1]
    codes[:, 1:] = step.reshape(t, k - 1)
    codes = np.cumsum(codes, axis=1)
    if t and codes.max() > params.max_code:
        raise ValueError("compact codec: log-prob codes out of range (corrupt data)")
    return codes


def _decode_ids(table: pa.Table, codes: np.ndarray, pos_off: np.ndarray, sampled: np.ndarray) -> np.ndarray:
    t, k = codes.shape
    start, ctx = ck.run_structure(codes)
    sampled_index = np.frombuffer(_binary_parts(table["ck_sampled"])[1].tobytes(), dtype=_sampled_dtype(k)).astype(np.int64)
    is_sampled = np.arange(k)[None, :] == sampled_index[:, None]
    coded = ~is_sampled
    sym = np.zeros((t, k), dtype=np.uint8)
    for name, mask in _symbol_streams(start, ctx, coded).items():
        stream = _binary_parts(table[name])[1]
        if stream.size != int(mask.sum()):
            raise ValueError(f"compact codec: column {name} holds {stream.size} symbols, the structure needs {int(mask.sum())} (corrupt data)")
        sym[mask] = stream
    coded_sym = sym[coded]
    row_of_pos = np.repeat(np.arange(len(pos_off) - 1), np.diff(pos_off))
    entry_row = np.broadcast_to(row_of_pos[:, None], (t, k))[coded]
    value = ck.symbols_to_int(coded_sym, _unpack_row_bits(table["ck_bits"], ck.symbol_widths(coded_sym), entry_row))
    # Run starts are whole ids, other entries gaps (+1) from the previous id, and the sampled entry
    # restarts the running sum from the sampled token: a cumulative sum restarted at each segment.
    base = np.zeros((t, k), dtype=np.int64)
    base[coded] = value + np.where(start[coded], 0, 1)
    base[is_sampled] = np.repeat(sampled, is_sampled.sum(axis=1))
    flat = base.ravel()
    csum = np.cumsum(flat)
    seg = np.maximum.accumulate(np.where((start | is_sampled).ravel(), np.arange(flat.size), 0))
    return (csum - csum[seg] + flat[seg]).reshape(t, k).astype(np.int32)
