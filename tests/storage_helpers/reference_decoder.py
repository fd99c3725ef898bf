"""A slow, loop-by-loop decoder of one `compact` row, written from storage/SCHEMA.md only (no lopd
imports): if it agrees with storage.codecs.decode_table, the schema document is enough to decode."""

from __future__ import annotations

import math

import numpy as np

FLOOR = math.log(1e-30)


def _grid(code: int, h: float, pk: float, m: float) -> float:
    t = math.log(pk)
    y_t = t / h
    c = t - 2 * math.log(m / h)
    y_c = y_t - (2 / h) * (1 - h / m)
    y = -code
    if y >= y_t:
        return y * h
    if y >= y_c:
        return t + 2 * math.log(1 - (y_t - y) * h / 2)
    return c + (y - y_c) * m


class _Bits:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, width: int) -> int:
        value = 0
        for b in range(width):
            bit = (self.data[(self.pos + b) // 8] >> ((self.pos + b) % 8)) & 1
            value |= bit << b
        self.pos += width
        return value


def _symbol_value(s: int, bits: _Bits) -> int:
    if s < 16:
        return s - 1
    w = ((s - 16) >> 3) + 1
    return (((8 | ((s - 16) & 7)) << w) | bits.read(w)) - 1


def decode_row_numpy_only(row: dict, codec: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(topk_ids [R, K], topk_logprobs [R, K], tail_logprob [R]) of one row given as Python values."""
    assert codec["codec"] == "compact" and codec["codec_version"] == 2
    k = codec["k"]
    h, pk, m = (codec["params"][name] for name in ("head_step", "knee_prob", "max_step"))
    r = row["num_response_tokens"]
    response = row["token_ids"][row["prompt_len"] :]
    sampled_at = np.frombuffer(row["ck_sampled"], dtype="u1" if k < 255 else "<u2")
    raw = _Bits(row["ck_bits"])  # the ck_runx raw bits come first in the row
    run_bytes, extras = iter(row["ck_runs"]), iter(row["ck_runx"])
    streams = {"abs": iter(row["ck_abs"]), **{c: iter(row[f"ck_gap{c}"]) for c in range(4)}}
    ids = np.zeros((r, k), dtype=np.int64)
    codes = np.zeros((r, k), dtype=np.int64)
    starts = np.zeros((r, k), dtype=bool)
    for t in range(r):
        j = 0
        while j < k:
            byte = next(run_bytes)
            step, field = byte >> 4, byte & 15
            if step == 15:
                step += _symbol_value(next(extras), raw)
            if field == 15:
                field += _symbol_value(next(extras), raw)
            code = step if j == 0 else codes[t, j - 1] + step + 1
            length = k - j if field == 0 else field
            assert 1 <= length <= k - j
            codes[t, j : j + length] = code
            starts[t, j] = True
            j += length
    assert next(run_bytes, None) is None and next(extras, None) is None
    for t in range(r):
        run_index, run_length = [0] * k, [0] * k
        for j in range(k):
            run_index[j] = 0 if starts[t, j] else run_index[j - 1] + 1
        for j in reversed(range(k)):
            run_length[j] = run_index[j] + 1 if j == k - 1 or starts[t, j + 1] else run_length[j + 1]
        for j in range(k):
            if j == sampled_at[t]:
                ids[t, j] = response[t]
            elif starts[t, j]:
                ids[t, j] = _symbol_value(next(streams["abs"]), raw)
            else:
                context = min(4 * run_index[j] // run_length[j], 3)
                ids[t, j] = ids[t, j - 1] + _symbol_value(next(streams[context]), raw) + 1
    logprobs = np.array([[_grid(int(c), h, pk, m) for c in row_codes] for row_codes in codes],
                        dtype=np.float32).reshape(r, k)
    tail_codes = [(row["ck_tail"][t] + int(codes[t, k - 1])) % 256 for t in range(r)]
    tail = np.array([max(_grid(c, h, pk, m), FLOOR) for c in tail_codes], dtype=np.float32)
    return ids, logprobs, tail
