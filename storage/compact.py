"""The `compact` top-k codec: the numpy kernels (layout byte by byte in storage/SCHEMA.md).

Per position, the K (id, log-prob) pairs are coded as
1. quantised log-probs: a uint8 code per entry on a companded grid (fine step where p >= knee_prob,
   a step growing like 1/sqrt(p) below it, capped at max_step). Since the KL contribution of an
   entry is about p * step^2 / 24, this spends bits where the loss can see them.
2. a canonical order: entries sorted by (code ascending = log-prob descending, id ascending). The
   order among entries with equal codes carries no information the decoded values can show, so it
   is not stored: that is what lets ids inside a run of equal codes be coded as a sorted set (gaps).
   The codes are coded run by run: one byte holds the run's code step and its length (0 for the
   position's last run, whose length follows from K), each nibble capped at 15 with larger values
   continuing as integer symbols. The tail code is stored relative to the last entry's code.
3. ids: the sampled token (stored anyway in token_ids) is coded by its index in the canonical order;
   the first id of each run is coded whole; later ids of a run as gaps from the previous id. Each
   integer x >= 0 becomes a byte symbol (bit length + top 3 mantissa bits, left to zstd's entropy
   coder) plus raw low bits packed LSB-first. Gap symbols go to 4 streams by relative position in
   their run, because gaps grow along a run (ids are roughly frequency-ordered).

Shape key: T = positions (concatenated over rollouts), K = top-k, N = T * K entries.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from storage.records import TAIL_LOGPROB_FLOOR

GAP_CONTEXTS = 4
MANTISSA_BITS = 3  # bits after the leading 1 that an integer symbol holds (the rest are raw)
RUN_LEN_BITS = 4  # run byte = min(step, STEP_CAP) << RUN_LEN_BITS | min(length field, LEN_CAP) (see encode_runs)
LEN_CAP = (1 << RUN_LEN_BITS) - 1  # a field at its cap continues as an extra value in ck_runx
STEP_CAP = (1 << (8 - RUN_LEN_BITS)) - 1


@dataclass(frozen=True)
class CompactParams:
    """Quantisation grid of the compact codec (recorded in the shard metadata)."""

    head_step: float = 0.12  # nats between log-prob codes where p >= knee_prob (max error head_step / 2)
    knee_prob: float = 3e-3  # below this probability the step grows like head_step * sqrt(knee_prob / p)
    max_step: float = 3.0  # cap of the step, reached at p = knee_prob * (head_step / max_step)^2

    def __post_init__(self) -> None:
        if not 0 < self.head_step <= 1:
            raise ValueError(f"compact codec: head_step={self.head_step} must be in (0, 1] nats")
        if not 0 < self.knee_prob < 1:
            raise ValueError(f"compact codec: knee_prob={self.knee_prob} must be in (0, 1)")
        if self.max_step < self.head_step:
            raise ValueError(f"compact codec: max_step={self.max_step} must be >= head_step={self.head_step}")
        if self.max_code > 255:
            raise ValueError(
                f"compact codec: head_step={self.head_step}, max_step={self.max_step} need {self.max_code + 1} "
                "log-prob codes, more than a uint8 holds; raise head_step or max_step"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    # grid geometry, all in the companded domain y <= 0 (code = -y)
    @property
    def knee(self) -> float:  # log-prob where the step starts growing
        return math.log(self.knee_prob)

    @property
    def cap(self) -> float:  # log-prob where the step reaches max_step
        return self.knee - 2.0 * math.log(self.max_step / self.head_step)

    @property
    def y_knee(self) -> float:
        return self.knee / self.head_step

    @property
    def y_cap(self) -> float:
        return self.y_knee - (2.0 / self.head_step) * (1.0 - self.head_step / self.max_step)

    @property
    def max_code(self) -> int:
        return int(math.ceil(-(self.y_cap + (TAIL_LOGPROB_FLOOR - self.cap) / self.max_step)))


# Named grids. "fine" (the default) keeps errors <= 0.06 nats where p >= 3e-3; "lean" spends fewer bytes on
# the low-probability entries for about 2.5x the mean KL (measured in docs/benchmarks.md; both far below 1e-3).
GRIDS: dict[str, CompactParams] = {
    "fine": CompactParams(),
    "lean": CompactParams(head_step=0.15, knee_prob=1e-2, max_step=6.0),
}


def quantize_logprobs(lp: np.ndarray, p: CompactParams) -> np.ndarray:
    """Log-probs (any shape) -> uint8 codes; larger code = smaller log-prob."""
    lp = np.clip(np.asarray(lp, dtype=np.float64), TAIL_LOGPROB_FLOOR, 0.0)
    y = np.where(
        lp >= p.knee,
        lp / p.head_step,
        np.where(
            lp >= p.cap,
            p.y_knee - (2.0 / p.head_step) * (1.0 - np.exp((lp - p.knee) / 2.0)),
            p.y_cap + (lp - p.cap) / p.max_step,
        ),
    )
    return np.clip(np.rint(-y), 0, p.max_code).astype(np.uint8)


def dequantize_logprobs(codes: np.ndarray, p: CompactParams) -> np.ndarray:
    """uint8 codes -> float32 log-probs at the grid points."""
    y = -np.asarray(codes, dtype=np.float64)
    sqrt_arg = np.maximum(1.0 - (p.y_knee - y) * p.head_step / 2.0, 1e-300)
    lp = np.where(
        y >= p.y_knee,
        y * p.head_step,
        np.where(y >= p.y_cap, p.knee + 2.0 * np.log(sqrt_arg), p.cap + (y - p.y_cap) * p.max_step),
    )
    return lp.astype(np.float32)


# ------------------------------------------------------------------ integer symbols
def int_to_symbols(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x >= 0 -> (uint8 symbol, raw bit width, raw bits). With m = MANTISSA_BITS, v = x + 1 and
    b = floor(log2 v): v < 2^(m+1) -> symbol v, no raw bits; else symbol 2^(m+1) + 2^m (b - m - 1) +
    (the m bits after the leading 1), and the b - m low bits of v raw."""
    m = MANTISSA_BITS
    v = np.asarray(x, dtype=np.int64) + 1
    b = np.frexp(v.astype(np.float64))[1].astype(np.int64) - 1  # exact for v < 2^53
    small = v < (2 << m)
    width = np.where(small, 0, b - m)
    top = (v >> np.maximum(width, 0)) & ((1 << m) - 1)
    sym = np.where(small, v, (2 << m) + ((b - m - 1) << m) + top)
    raw = v & ((np.int64(1) << width) - 1)
    return sym.astype(np.uint8), width, raw


def symbol_widths(sym: np.ndarray) -> np.ndarray:
    m = MANTISSA_BITS
    s = sym.astype(np.int64)
    return np.where(s < (2 << m), 0, ((s - (2 << m)) >> m) + 1)


def symbols_to_int(sym: np.ndarray, raw: np.ndarray) -> np.ndarray:
    m = MANTISSA_BITS
    s = sym.astype(np.int64)
    width = symbol_widths(sym)
    v = np.where(s < (2 << m), s, (((1 << m) | (s & ((1 << m) - 1))) << width) | raw)
    return v - 1


def pack_bits(raw: np.ndarray, width: np.ndarray, bit_offset: np.ndarray, total_bytes: int) -> np.ndarray:
    """Write raw[i] (width[i] <= 32 bits, LSB first) at bit bit_offset[i] of a zeroed little-endian buffer.

    bit_offset must be non-decreasing and fields must not overlap: then the fields landing in one
    64-bit word are consecutive, and their sum is their bitwise OR.
    """
    n_words = (total_bytes + 7) // 8 + 1
    words = np.zeros(n_words, dtype=np.uint64)
    keep = width > 0
    if keep.any():
        value = raw[keep].astype(np.uint64)
        width, bit_offset = width[keep], bit_offset[keep]
        shift = (bit_offset & 63).astype(np.uint64)
        word = bit_offset >> 6
        first = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
        words[word[first]] = np.add.reduceat(value << shift, first)
        cross = (bit_offset & 63) + width > 64
        words[word[cross] + 1] |= value[cross] >> (np.uint64(64) - shift[cross])
    return words.view("<u1")[:total_bytes].copy()


def unpack_bits(buf: np.ndarray, width: np.ndarray, bit_offset: np.ndarray) -> np.ndarray:
    """Read width[i] <= 32 bits (LSB first) at bit bit_offset[i] of a little-endian buffer."""
    padded = np.zeros(((buf.size + 7) // 8 + 1) * 8, dtype=np.uint8)
    padded[: buf.size] = buf
    words = padded.view("<u8")
    word = bit_offset >> 6
    shift = (bit_offset & 63).astype(np.uint64)
    low = words[word] >> shift
    spill = np.where(shift > 0,
                     words[np.minimum(word + 1, words.size - 1)] << ((np.uint64(64) - shift) & np.uint64(63)),
                     np.uint64(0))
    mask = (np.uint64(1) << width.astype(np.uint64)) - np.uint64(1)
    return ((low | spill) & mask).astype(np.int64)


# ------------------------------------------------------------------ canonical structure
def run_structure(codes_T_K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal codes along each position: (run_start [T, K] bool, gap context [T, K] in 0..3)."""
    t, k = codes_T_K.shape
    start = np.ones((t, k), dtype=bool)
    start[:, 1:] = codes_T_K[:, 1:] != codes_T_K[:, :-1]
    flat = start.ravel()
    first = np.flatnonzero(flat)
    run = np.cumsum(flat) - 1
    idx = np.arange(flat.size) - first[run]
    length = np.diff(np.append(first, flat.size))[run]
    ctx = np.minimum(GAP_CONTEXTS * idx // np.maximum(length, 1), GAP_CONTEXTS - 1)
    return start, ctx.reshape(t, k)


def canonical_order(ids_T_K: np.ndarray, codes_T_K: np.ndarray) -> np.ndarray:
    """Permutation [T, K] sorting each position by (code ascending, id ascending)."""
    key = codes_T_K.astype(np.int64) << np.int64(32) | ids_T_K.astype(np.int64)
    return np.argsort(key, axis=1, kind="stable")


# ------------------------------------------------------------------ runs of equal codes
def encode_runs(codes_T_K: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Canonically ordered codes [T, K] -> (run byte uint8 [R], flat index t * K + j of each run's
    first entry [R], extra values [X], run index of each extra value [X]), runs in (t, j) order.

    A run's step is its code for the first run of a position, else its code minus the previous
    run's code minus 1. Its length field is 0 for the last run of a position (it reaches entry K - 1),
    else its length L >= 1. Run byte = min(step, STEP_CAP) << RUN_LEN_BITS | min(length field, LEN_CAP);
    a field equal to its cap continues as an extra value (field - cap: the step's first), in run order.
    """
    t, k = codes_T_K.shape
    flat = codes_T_K.astype(np.int64).ravel()
    start = np.ones((t, k), dtype=bool)
    start[:, 1:] = codes_T_K[:, 1:] != codes_T_K[:, :-1]
    first = np.flatnonzero(start.ravel())
    length = np.diff(np.append(first, flat.size))
    step = np.where(first % k == 0, flat[first], flat[first] - flat[np.maximum(first - 1, 0)] - 1)
    fields = np.stack([step, np.where((first % k) + length == k, 0, length)], axis=1)
    caps = np.array([STEP_CAP, LEN_CAP])
    run_byte = (np.minimum(fields[:, 0], STEP_CAP) << RUN_LEN_BITS) | np.minimum(fields[:, 1], LEN_CAP)
    has_extra = fields >= caps
    extra = (fields - caps)[has_extra]  # row-major: run order, the step's extra first
    extra_run = np.repeat(np.arange(first.size), has_extra.sum(axis=1))
    return run_byte.astype(np.uint8), first, extra, extra_run


def run_extra_counts(run_byte: np.ndarray) -> np.ndarray:
    """Number of extra values (0-2) each run byte announces."""
    b = run_byte.astype(np.int64)
    return ((b >> RUN_LEN_BITS) == STEP_CAP).astype(np.int64) + ((b & LEN_CAP) == LEN_CAP)


def decode_runs(run_byte: np.ndarray, extra: np.ndarray, t: int, k: int,
                max_code: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of encode_runs: (codes [T, K], run lengths [R]). Raises ValueError when the runs do not tile T x K."""
    b = run_byte.astype(np.int64)
    fields = np.stack([b >> RUN_LEN_BITS, b & LEN_CAP], axis=1)
    has_extra = fields == np.array([STEP_CAP, LEN_CAP])
    if extra.size != int(has_extra.sum()):
        raise ValueError(f"compact codec: ck_runx holds {extra.size} values, ck_runs announces "
                         f"{int(has_extra.sum())} (corrupt data)")
    fields[has_extra] += extra
    step, length = fields[:, 0], fields[:, 1]
    last = length == 0
    if int(last.sum()) != t or (last.size and not last[-1]):
        raise ValueError(f"compact codec: ck_runs ends {int(last.sum())} positions, the rows hold {t} (corrupt data)")
    new_position = np.r_[True, last[:-1]] if last.size else last
    before = np.cumsum(length) - length
    j = before - before[np.maximum.accumulate(np.where(new_position, np.arange(last.size), 0))]
    length = np.where(last, k - j, length)
    if (length < 1).any() or (~last & (j + length >= k)).any():
        raise ValueError("compact codec: the runs of ck_runs do not tile the positions (corrupt data)")
    inc = step + ~new_position
    csum = np.cumsum(inc)
    seg = np.maximum.accumulate(np.where(new_position, np.arange(inc.size), 0))
    code = csum - csum[seg] + inc[seg]
    if code.size and code.max() > max_code:
        raise ValueError("compact codec: log-prob codes out of range (corrupt data)")
    return np.repeat(code, length).reshape(t, k), length
