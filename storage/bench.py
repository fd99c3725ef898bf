"""`lopd bench storage --json`: bytes/token, fidelity and throughput of the top-k codecs, and the
reader's memory, on synthetic teacher distributions (storage/synthetic.py; see docs/benchmarks.md).

Bytes per token are whole-shard bytes (every column, Parquet overhead included) divided by the
response tokens; `topk_bytes_per_token` counts only the top-k columns (ids, log-probs, tail).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import psutil
import pyarrow.parquet as pq

from storage.codecs import TOPK_COLUMNS, codec_info, codec_params, decode_table, encode_records
from storage.reader import iter_batches
from storage.records import TeacherRecord, compute_tail_logprob
from storage.shardset import ShardSet
from storage.synthetic import SyntheticConfig, generate

# DistillKit README (arcee-ai/distillkit): recommended k=128 capture "~300 bytes/token", budget k=50 "~114".
DISTILLKIT_BYTES_PER_TOKEN = {128: 300.0, 50: 114.0}
TARGET_RATIO = 0.6
TARGET_MEAN_KL = 1e-3  # nats per position, exact vs decoded top-k
DEFAULT_CASES: tuple[dict, ...] = (
    {"name": "demo", "vocab_size": 20, "k": 8},
    {"name": "large-k50", "vocab_size": 151_936, "k": 50},
    {"name": "large-k128", "vocab_size": 151_936, "k": 128},
)
CODEC_NAMES = ("plain", "compact", "compact-lean")
LONG_ROW_VOCAB = 151_936  # the write/read-path measurements: Qwen3's vocabulary, 4,096-token rollouts
LONG_ROW_TOKENS = 4096  # "<codec>[-<grid>]", grids in storage.compact.GRIDS
T = TypeVar("T")
_END = object()  # paced_consumer's end-of-stream marker


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def truncate_k(records: Sequence[TeacherRecord], k: int) -> list[TeacherRecord]:
    """The top-k of records holding a larger top-k (descending order), with the tail recomputed."""
    return [
        dataclasses.replace(r, topk_ids=r.topk_ids[:, :k].copy(), topk_logprobs=r.topk_logprobs[:, :k].copy(),
                            tail_logprob=compute_tail_logprob(r.topk_logprobs[:, :k]))
        for r in records
    ]


def _generator_config(vocab_size: int, k: int, positions: int, id_noise: float, seed: int) -> SyntheticConfig:
    small = vocab_size < 1000
    return SyntheticConfig(
        vocab_size=vocab_size, k=k, num_rollouts=max(1, positions // 128), response_len=128,
        prompt_len=16, id_noise=id_noise, seed=seed,
        topic_size=max(1, min(200, vocab_size // 4)), max_head_tokens=min(6, vocab_size),
        chunk=512 if small else 64,
    )


def _fidelity(exact: Sequence[TeacherRecord], decoded: Sequence[TeacherRecord]) -> dict:
    """Errors of the decoded top-k against the exact one, matched by id (the compact order may differ in ties)."""
    lp_x = np.concatenate([r.topk_logprobs for r in exact]).astype(np.float64)
    ids_x = np.concatenate([r.topk_ids for r in exact])
    lp_d = np.concatenate([r.topk_logprobs for r in decoded]).astype(np.float64)
    ids_d = np.concatenate([r.topk_ids for r in decoded])
    ox, od = np.argsort(ids_x, axis=1), np.argsort(ids_d, axis=1)
    ids_exact = bool(np.array_equal(np.take_along_axis(ids_x, ox, 1), np.take_along_axis(ids_d, od, 1)))
    lp_x, lp_d = np.take_along_axis(lp_x, ox, 1), np.take_along_axis(lp_d, od, 1)
    err = np.abs(lp_x - lp_d)
    visible = lp_x >= np.log(1e-3)
    p, q = np.exp(lp_x), np.exp(lp_d)
    kl = (p / p.sum(1, keepdims=True)
          * (np.log(p / p.sum(1, keepdims=True)) - np.log(q / q.sum(1, keepdims=True)))).sum(1)
    tail_x = np.concatenate([r.tail_logprob for r in exact]).astype(np.float64)
    tail_d = np.concatenate([r.tail_logprob for r in decoded]).astype(np.float64)
    # KL over the k+1 buckets a tail-aware loss sees (the decoded side renormalised)
    px = np.concatenate([p, np.exp(tail_x)[:, None]], axis=1)
    qx = np.concatenate([q, np.exp(tail_d)[:, None]], axis=1)
    px, qx = px / px.sum(1, keepdims=True), qx / qx.sum(1, keepdims=True)
    kl_tail = (px * (np.log(np.maximum(px, 1e-300)) - np.log(np.maximum(qx, 1e-300)))).sum(1)
    tail_visible = tail_x >= np.log(1e-3)
    exact_fields = all(
        a.token_ids.tobytes() == b.token_ids.tobytes() and a.teacher_logprobs.tobytes() == b.teacher_logprobs.tobytes()
        and a.behavior_logprobs.tobytes() == b.behavior_logprobs.tobytes() for a, b in zip(exact, decoded)
    )
    return {
        "ids_exact": ids_exact,
        "sampled_and_behavior_logprobs_exact": exact_fields,
        "max_abs_logprob_error": float(err[visible].max()),
        "max_abs_logprob_error_all_entries": float(err.max()),
        "mean_kl_exact_to_decoded": float(kl.mean()),
        "p99_kl_exact_to_decoded": float(np.quantile(kl, 0.99)),
        "mean_kl_with_tail_bucket": float(kl_tail.mean()),
        "max_abs_tail_error": float(np.abs(tail_x - tail_d)[tail_visible].max()) if tail_visible.any() else 0.0,
    }


def _column_bytes(path: Path) -> dict[str, int]:
    meta = pq.ParquetFile(path).metadata
    sizes: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            name = col.path_in_schema.split(".")[0]
            sizes[name] = sizes.get(name, 0) + col.total_compressed_size
    return sizes


def _tile(records: Sequence[TeacherRecord], copies: int) -> list[TeacherRecord]:
    return [dataclasses.replace(r, prompt_id=f"{r.prompt_id}-{c}") for c in range(copies) for r in records]


def _run_case(case: dict, variant: str, records: list[TeacherRecord], tmp: Path, throughput_tokens: int) -> dict:
    k, vocab = case["k"], case["vocab_size"]
    codec, _, grid = variant.partition("-")
    params = codec_params(codec, grid or None)
    info = codec_info(codec, k, vocab, **params)
    tokens = sum(r.num_response_tokens for r in records)
    size_set = ShardSet.create(tmp / f"{case['name']}-{variant}-size", "teacher_topk", info)
    shard = size_set.write_shard(0, encode_records(records, codec, k, vocab, **params))
    columns = _column_bytes(size_set.shard_path(0))
    decoded = decode_table(size_set.read_shard(0))

    copies = max(1, -(-throughput_tokens // tokens))
    tiled = _tile(records, copies)
    per_shard = max(1, len(tiled) // 4)
    speed_set = ShardSet.create(tmp / f"{case['name']}-{variant}-speed", "teacher_topk", info)
    t0 = time.perf_counter()
    for i in range(0, len(tiled), per_shard):
        speed_set.write_shard(i // per_shard, encode_records(tiled[i : i + per_shard], codec, k, vocab, **params))
    write_s = time.perf_counter() - t0
    speed_set.finalize(expected_shards=-(-len(tiled) // per_shard))  # the reader reads finished sets only
    t0 = time.perf_counter()
    read_tokens = sum(r.num_response_tokens
                      for batch, _ in iter_batches(speed_set.root, 16, num_epochs=1) for r in batch)
    read_s = time.perf_counter() - t0
    topk_bytes = sum(columns.get(c, 0) for c in TOPK_COLUMNS[codec])
    result = {
        "case": case["name"], "codec": codec, "grid": grid or ("fine" if codec == "compact" else None), "k": k,
        "vocab_size": vocab, "response_tokens": tokens,
        "bytes_per_token": shard["bytes"] / tokens,
        "topk_bytes_per_token": topk_bytes / tokens,
        "bytes_per_token_by_column": {name: round(b / tokens, 3) for name, b in columns.items()},
        **_fidelity(records, decoded),
        "write_tokens_per_s": tokens * copies / write_s,
        "read_tokens_per_s": read_tokens / read_s,
        "peak_rss_mb": _peak_rss_mb(),
    }
    if k in DISTILLKIT_BYTES_PER_TOKEN:
        anchor = DISTILLKIT_BYTES_PER_TOKEN[k]
        result["distillkit_bytes_per_token"] = anchor
        result["ratio_vs_distillkit"] = result["bytes_per_token"] / anchor
        result["topk_ratio_vs_distillkit"] = result["topk_bytes_per_token"] / anchor
        result["meets_target"] = (result["ratio_vs_distillkit"] <= TARGET_RATIO
                                  and result["mean_kl_exact_to_decoded"] <= TARGET_MEAN_KL)
    return result


def _stream_rss(root: str, shuffle_buffer: int, load_all: bool) -> dict:
    """In a fresh interpreter: RSS growth while streaming the shard set (or decoding it all at once)."""
    process = psutil.Process()
    baseline = peak = process.memory_info().rss
    if load_all:
        shard_set = ShardSet.open(Path(root))
        held = [decode_table(shard_set.read_shard(i)) for i in shard_set.complete_indices()]
        peak = max(peak, process.memory_info().rss)
        rows = sum(len(h) for h in held)
        return {"rows": rows, "rss_growth_mb": (peak - baseline) / 2**20}
    total = ShardSet.open(Path(root)).manifest["totals"]["rows"]
    rows, quarter = 0, None
    for batch, _ in iter_batches(root, 4, shuffle_buffer=shuffle_buffer, num_epochs=1):
        rows += len(batch)
        peak = max(peak, process.memory_info().rss)
        if quarter is None and rows >= total // 4:
            quarter = peak
    return {"rows": rows, "rss_growth_mb": (peak - baseline) / 2**20,
            "rss_growth_first_quarter_mb": ((quarter or peak) - baseline) / 2**20}


def _in_fresh_process(root: Path, shuffle_buffer: int, load_all: bool) -> dict:
    code = (
        "import json, sys; from storage.bench import _stream_rss; "
        f"print(json.dumps(_stream_rss({str(root)!r}, {shuffle_buffer}, {load_all})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def reader_memory_check(records: list[TeacherRecord], tmp: Path, *, codec: str, k: int, vocab_size: int,
                        copies: int = 24, shuffle_buffer: int = 8, rows_per_group: int = 8) -> dict:
    """Stream a shard set whose decoded size is far larger than the shuffle buffer and report the RSS
    growth of a fresh process, beside the growth when the same shards are decoded all at once."""
    tiled = _tile(records, copies)
    shard_set = ShardSet.create(tmp / "reader-memory", "teacher_topk", codec_info(codec, k, vocab_size))
    per_shard = max(1, len(tiled) // 3)
    for i in range(0, len(tiled), per_shard):
        shard_set.write_shard(i // per_shard, encode_records(tiled[i : i + per_shard], codec, k, vocab_size),
                              row_group_size=rows_per_group)
    shard_set.finalize(expected_shards=-(-len(tiled) // per_shard))
    per_row_mb = sum(r.token_ids.nbytes + r.topk_ids.nbytes + r.topk_logprobs.nbytes + 3 * r.teacher_logprobs.nbytes
                     for r in records) / len(records) / 2**20
    streamed = _in_fresh_process(shard_set.root, shuffle_buffer, load_all=False)
    loaded = _in_fresh_process(shard_set.root, shuffle_buffer, load_all=True)
    return {
        "codec": codec, "k": k, "rows": streamed["rows"], "shard_set_mb": shard_set.manifest["totals"]["bytes"] / 2**20,
        "decoded_dataset_mb": per_row_mb * len(tiled), "shuffle_buffer_rows": shuffle_buffer,
        "row_group_rows": rows_per_group,
        "decoded_buffer_plus_row_group_mb": per_row_mb * (shuffle_buffer + rows_per_group),
        "rss_growth_streaming_mb": streamed["rss_growth_mb"],
        "rss_growth_streaming_first_quarter_mb": streamed["rss_growth_first_quarter_mb"],
        "rss_growth_decode_all_mb": loaded["rss_growth_mb"],
    }


def run_storage_bench(cases: Sequence[dict] = DEFAULT_CASES, *, codecs: Sequence[str] = CODEC_NAMES,
                      positions: int = 2048, throughput_tokens: int = 16384, id_noise: float = 2.5, seed: int = 0,
                      reader_memory: bool = True, read_ks: Sequence[int] = (0, 20, 128), read_rows: int = 16,
                      read_length: int = LONG_ROW_TOKENS, consumer_tokens_per_s: float = 7500.0) -> dict:
    """One JSON-able object: per (case, codec) size, fidelity and throughput; generator summary; reader memory;
    per k in ``read_ks``, the read speed and consumer stall (with and without prefetch) on ``read_rows``
    rollouts of ``read_length`` tokens at vocab 151,936 (none if read_ks is empty)."""
    started = time.perf_counter()
    results, generators = [], {}
    biggest: dict[int, tuple[list[TeacherRecord], int]] = {}
    for case in sorted(cases, key=lambda c: -c["k"]):  # generate once per vocabulary at the largest k
        vocab = case["vocab_size"]
        if vocab not in biggest:
            cfg = _generator_config(vocab, case["k"], positions, id_noise, seed)
            t0 = time.perf_counter()
            records, summary = generate(cfg)
            generators[str(vocab)] = {"config": cfg.to_dict(), "summary": summary, "seconds": time.perf_counter() - t0}
            biggest[vocab] = (records, case["k"])
    with tempfile.TemporaryDirectory(prefix="lopd-bench-storage-") as tmp_s:
        tmp = Path(tmp_s)
        for case in cases:
            source, source_k = biggest[case["vocab_size"]]
            records = source if case["k"] == source_k else truncate_k(source, case["k"])
            for codec in codecs:
                results.append(_run_case(case, codec, records, tmp, throughput_tokens))
        memory = None
        if reader_memory:
            vocab, (records, k) = max(biggest.items())
            memory = reader_memory_check(records, tmp, codec="compact", k=k, vocab_size=vocab)
        long_rows = []
        if read_ks:
            source = long_row_records(max(read_ks), read_rows, length=read_length, seed=seed)
            long_rows = read_path(source, read_ks, tmp, consumer_tokens_per_s=consumer_tokens_per_s)
    return {
        "bench": "storage",
        "synthetic": True,
        "generators": generators,
        "cases": results,
        "reader_memory": memory,
        "read_path": long_rows,
        "distillkit_anchor_bytes_per_token": DISTILLKIT_BYTES_PER_TOKEN,
        "target_ratio": TARGET_RATIO,
        "target_mean_kl": TARGET_MEAN_KL,
        "cpu_count": psutil.cpu_count(),
        "seconds": time.perf_counter() - started,
    }


# ------------------------------------------------------------------ long rows: write cost, read speed, stall
def long_row_records(k: int, rows: int, *, length: int = LONG_ROW_TOKENS, vocab_size: int = LONG_ROW_VOCAB,
                     prompt_len: int = 64, seed: int = 0) -> list[TeacherRecord]:
    """``rows`` synthetic rollouts of ``length`` tokens (prompt included) at a real vocabulary."""
    cfg = _generator_config(vocab_size, max(k, 1), rows * (length - prompt_len), 2.5, seed)
    cfg = dataclasses.replace(cfg, num_rollouts=rows, response_len=length - prompt_len, prompt_len=prompt_len)
    records, _ = generate(cfg)
    return truncate_k(records, k)


def write_path_cost(records: list[TeacherRecord], ks: Sequence[int], tmp: Path, *, codec: str = "compact",
                    vocab_size: int = LONG_ROW_VOCAB) -> list[dict]:
    """Per k: the extraction stage's write path (encode_records, then a Parquet shard write) on one core
    (Arrow's thread pools at 1 thread; numpy's element-wise kernels are single-threaded)."""
    import pyarrow as pa

    cpu, io = pa.cpu_count(), pa.io_thread_count()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    out = []
    try:
        for k in ks:
            recs = truncate_k(records, k)
            tokens = sum(r.num_response_tokens for r in recs)
            shard_set = ShardSet.create(tmp / f"write-k{k}", "teacher_topk", codec_info(codec, k, vocab_size))
            t0 = time.perf_counter()
            table = encode_records(recs, codec, k, vocab_size)
            t1 = time.perf_counter()
            info = shard_set.write_shard(0, table)
            t2 = time.perf_counter()
            out.append({"k": k, "codec": codec, "response_tokens": tokens,
                        "encode_us_per_token": round((t1 - t0) / tokens * 1e6, 3),
                        "write_tokens_per_s_one_core": round(tokens / (t2 - t0), 1),
                        "bytes_per_token": round(info["bytes"] / tokens, 2)})
    finally:
        pa.set_cpu_count(cpu)
        pa.set_io_thread_count(io)
    return out


def paced_consumer(items: Iterable[T], tokens_of: Callable[[T], int],
                   consumer_tokens_per_s: float) -> tuple[list[float], list[int]]:
    """Iterate like a training loop whose step on an item takes (tokens_of(item) / consumer_tokens_per_s)
    seconds (a sleep, which releases the GIL like GPU work does). Returns the seconds spent waiting for each item
    and, last, for the end of the stream (n + 1 waits), and each item's tokens (n)."""
    waits: list[float] = []
    tokens: list[int] = []
    items = iter(items)
    while True:
        t0 = time.perf_counter()
        item = next(items, _END)
        waits.append(time.perf_counter() - t0)
        if item is _END:
            return waits, tokens
        tokens.append(tokens_of(item))
        time.sleep(tokens[-1] / consumer_tokens_per_s)


def _consume(batches, consumer_tokens_per_s: float) -> dict:
    """``paced_consumer`` over the reader's ``(records, state)`` batches; the stall is the time spent waiting."""
    waits, tokens = paced_consumer(batches, lambda item: sum(r.num_response_tokens for r in item[0]),
                                   consumer_tokens_per_s)
    wait, work = sum(waits), sum(tokens) / consumer_tokens_per_s
    return {"tokens": sum(tokens), "stall_fraction": round(wait / max(wait + work, 1e-9), 4)}


def read_path(records: list[TeacherRecord], ks: Sequence[int], tmp: Path, *, consumer_tokens_per_s: float = 7500.0,
              codec: str = "compact", vocab_size: int = LONG_ROW_VOCAB, batch_rows: int = 1,
              prefetch_depth: int = 2) -> list[dict]:
    """Per k: the reader's tokens/s (decode included, one row per row group, as long rollouts are; for k > 0
    also without the top-k columns, as a lightning-only trainer reads), and the stall fraction of a consumer at
    ``consumer_tokens_per_s`` without and with storage.prefetch."""
    from storage.prefetch import prefetch_batches

    out = []
    for k in ks:
        recs = truncate_k(records, k)
        shard_set = ShardSet.create(tmp / f"read-k{k}", "teacher_topk", codec_info(codec, k, vocab_size))
        shard_set.write_shard(0, encode_records(recs, codec, k, vocab_size), row_group_size=1)
        shard_set.finalize(expected_shards=1)
        kw = dict(shuffle_buffer=1, num_epochs=1)
        t0 = time.perf_counter()
        tokens = sum(r.num_response_tokens
                     for batch, _ in iter_batches(shard_set.root, batch_rows, **kw) for r in batch)
        read_s = time.perf_counter() - t0
        lean = {}
        if k:  # a lightning-only trainer reads these shards without the top-k columns
            t0 = time.perf_counter()
            for _ in iter_batches(shard_set.root, batch_rows, need_topk=False, **kw):
                pass
            lean = {"read_tokens_per_s_without_topk": round(tokens / (time.perf_counter() - t0), 1)}
        sync = _consume(iter_batches(shard_set.root, batch_rows, **kw), consumer_tokens_per_s)
        ahead = _consume(prefetch_batches(shard_set.root, batch_rows, depth=prefetch_depth, **kw),
                         consumer_tokens_per_s)
        out.append({"k": k, "codec": codec, "response_tokens": tokens, "read_tokens_per_s": round(tokens / read_s, 1),
                    **lean,
                    "consumer_tokens_per_s": consumer_tokens_per_s, "stall_fraction": sync["stall_fraction"],
                    "stall_fraction_prefetch": ahead["stall_fraction"]})
    return out
