"""Benchmarks that print one JSON object (`lopd bench extract`, `lopd bench train`). Figures are ratios
measured side by side in one process; absolute times on shared machines mean little."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import (
    DemoConfig,
    EngineConfig,
    OnlineConfig,
    RolloutsConfig,
    SamplingConfig,
    TeacherLogprobsConfig,
    TrainConfig,
    score_tokens_per_call,
)
from pipeline.demo.world import make_models
from pipeline.train.metrics import read_metrics


def _demo_models(tmp: Path) -> dict[str, Path]:
    demo = DemoConfig()
    return make_models(tmp / "models", demo.teacher, demo.student, seed=0)


def bench_extract(engine: str = "hf", model_dir: Path | None = None, sequences: int = 512, length: int = 40,
                  prompt_len: int = 9, k: int = 8, repeats: int = 3, codec: str = "compact",
                  shards: int = 4, write_ks: tuple[int, ...] = (0, 20, 50, 128), write_rows: int = 2,
                  memory_ks: tuple[int, ...] = (20, 128), memory_rows: int = 1024,
                  memory_length: int = 4096) -> dict[str, Any]:
    """Teacher scoring throughput: bare engine scoring vs the stage's full write path (top-k records, codec,
    Parquet shard write behind the next shard's scoring, as in ``teacher_logprobs``), on the same
    ``shards`` batches, alternating the two ``repeats`` times and taking medians; once with torch's default
    threads and once with torch on one thread (on a 2-core machine the writer then has its own core).

    Also, at vocab 151,936 on 4,096-token rows: the write path's CPU cost per k in ``write_ks``
    (``write_rows`` synthetic rollouts), and per k in ``memory_ks`` the host-memory peak of a worker running
    the stage's scoring loop over one ``memory_rows`` x ``memory_length``-token shard, with vLLM's ``generate``
    replaced by a stand-in returning vLLM's own output structures (no model, no GPU)."""
    import torch

    from storage.bench import long_row_records, write_path_cost

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model_dir = model_dir or _demo_models(tmp)["teacher"]
        threads = torch.get_num_threads()
        result = _scoring_overhead(engine, model_dir, tmp, sequences, length, prompt_len, k, repeats, codec, shards)
        torch.set_num_threads(1)
        try:
            one = _scoring_overhead(engine, model_dir, tmp / "one", sequences, length, prompt_len, k, repeats, codec,
                                    shards)
        finally:
            torch.set_num_threads(threads)
        result.update({"torch_threads": threads, "tokens_per_s_bare_torch_one_thread": one["tokens_per_s_bare"],
                       "tokens_per_s_with_write_torch_one_thread": one["tokens_per_s_with_write"],
                       "overhead_ratio_torch_one_thread": one["overhead_ratio"]})
        if write_ks:
            records = long_row_records(max(write_ks), write_rows)
            result["write_path"] = write_path_cost(records, write_ks, tmp)
        result["scoring_memory"] = [extraction_memory_peak(mk, memory_rows, memory_length) for mk in memory_ks]
    return result


def _scoring_overhead(engine: str, model_dir: Path, tmp: Path, sequences: int, length: int, prompt_len: int, k: int,
                      repeats: int, codec: str, shards: int) -> dict[str, Any]:
    from pipeline.engines import make_engine
    from pipeline.models import load_tokenizer
    from storage.codecs import encode_records
    from storage.records import TeacherRecord
    from storage.shardset import ShardSet, WriteBehind

    vocab = len(load_tokenizer(model_dir))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(4, vocab, size=length).tolist() for _ in range(sequences)]
    per_shard = -(-sequences // shards)
    pieces = [seqs[i : i + per_shard] for i in range(0, sequences, per_shard)]
    with make_engine(str(model_dir), EngineConfig(name=engine, batch_size=256), max_logprobs=k) as eng:
        eng.score(seqs[:8], [prompt_len] * 8, k)  # warm-up
        bare, full = [], []
        for r in range(repeats):
            t0 = time.perf_counter()
            for piece in pieces:
                eng.score(piece, [prompt_len] * len(piece), k)
            bare.append(time.perf_counter() - t0)
            out = ShardSet.create(tmp / f"shards-{r}", kind="teacher_topk", metadata={"k": k, "codec": codec})
            t0 = time.perf_counter()
            with WriteBehind(out) as writer:
                for index, piece in enumerate(pieces):
                    scored = eng.score(piece, [prompt_len] * len(piece), k)
                    records = [TeacherRecord(prompt_id=str(i), sample_index=0, token_ids=np.asarray(s, dtype=np.int32),
                                             prompt_len=prompt_len, teacher_logprobs=sc.token_logprobs,
                                             behavior_logprobs=sc.token_logprobs, topk_ids=sc.topk_ids,
                                             topk_logprobs=sc.topk_logprobs, tail_logprob=sc.tail_logprob, reward=None)
                               for i, (s, sc) in enumerate(zip(piece, scored))]
                    writer.submit(index, partial(encode_records, records, codec, k=k, vocab_size=vocab))
            full.append(time.perf_counter() - t0)
    tokens = sequences * (length - prompt_len)
    b, f = statistics.median(bare), statistics.median(full)
    return {"bench": "extract", "engine": engine, "model": str(model_dir), "sequences": sequences,
            "response_tokens": tokens, "k": k, "codec": codec, "shards": len(pieces), "repeats": repeats,
            "tokens_per_s_bare": round(tokens / b, 1), "tokens_per_s_with_write": round(tokens / f, 1),
            "overhead_ratio": round(f / b - 1.0, 4)}


class _StandInLLM:
    """``vllm.LLM.generate`` for scoring requests without a model: per prompt, ``prompt_logprobs`` in vLLM's
    own ``FlatLogprobs`` (Python lists: the host memory the real engine's outputs take), with fixed top-k
    rows. Only the memory and CPU work of the engine's conversion and the stage's write path are real."""

    def __init__(self, vocab_size: int, k: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.top_ids = np.stack([rng.choice(vocab_size, size=k, replace=False) for _ in range(256)]).astype(np.int64)
        self.top_lps = np.sort(rng.normal(-8.0, 3.0, size=(256, k)).clip(max=-1e-3), axis=1)[:, ::-1].astype(np.float32)

    def generate(self, prompts: list, params: list, use_tqdm: bool = False) -> list:
        from types import SimpleNamespace

        from vllm.logprobs import FlatLogprobs

        outs = []
        for prompt, p in zip(prompts, params):
            ids = np.asarray(prompt["prompt_token_ids"], dtype=np.int64)
            n, k = len(ids) - 1, p.prompt_logprobs
            rows = np.arange(n) % len(self.top_ids)
            flat_ids = np.concatenate([ids[1:, None], self.top_ids[rows, :k]], axis=1).ravel()
            flat_lps = np.concatenate([self.top_lps[rows, k - 1 : k] if k else np.full((n, 1), -1.0, np.float32),
                                       self.top_lps[rows, :k]], axis=1).ravel()
            entries = flat_ids.size
            pl = FlatLogprobs(start_indices=[0] + list(range(0, entries, k + 1)),
                              end_indices=[0] + list(range(k + 1, entries + 1, k + 1)),
                              token_ids=flat_ids.tolist(), logprobs=flat_lps.tolist(), ranks=[1] * entries,
                              decoded_tokens=[None] * entries)
            outs.append(SimpleNamespace(prompt_logprobs=pl, outputs=[]))
        return outs


def _import_vllm() -> None:
    """Import vLLM as ``VLLMEngine`` does before it scores (``from vllm import LLM``). In its own frame: on a
    CPU install vLLM keeps the ImportError of the missing torchcodec with its traceback, which pins the frame
    that first imports it; scoring through the stand-in would otherwise do that first import and keep one
    sub-batch's outputs alive for the rest of the process."""
    from vllm import LLM  # noqa: F401


def _scoring_memory_worker(k: int, rows: int, length: int, budget: int, codec: str,
                           logprobs_budget: int) -> dict[str, Any]:
    """Runs in a fresh process (its peak RSS is this measurement's): the teacher-logprobs stage's scoring
    loop over one rollouts shard of ``rows`` x ``length`` tokens, on a VLLMEngine whose LLM is the stand-in."""
    import resource

    import pyarrow as pa

    from pipeline.engines.vllm_engine import VLLMEngine
    from pipeline.stages.teacher_logprobs import _score_shards
    from storage.bench import LONG_ROW_VOCAB
    from storage.codecs import codec_info, encode_records
    from storage.shardset import ShardSet

    _import_vllm()
    vocab = LONG_ROW_VOCAB
    prompt_len = 256
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        rng = np.random.default_rng(0)
        rollouts = ShardSet.create(tmp / "rollouts", "samples", {})
        # the input shard streamed 64 rows at a time: making it must not set the process's peak
        with rollouts.shard_writer(0) as shard:
            for at in range(0, rows, 64):
                n = min(64, rows - at)
                shard.write(pa.table({
                    "prompt_id": [f"p{i}" for i in range(at, at + n)], "sample_index": [0] * n,
                    "token_ids": list(rng.integers(0, vocab, size=(n, length), dtype=np.int32)),
                    "prompt_len": [prompt_len] * n,
                    "behavior_logprobs": list(rng.normal(-1, 1, size=(n, length - prompt_len)).astype(np.float32)),
                    "reward": pa.array([None] * n, pa.float32())}))
        cfg = TeacherLogprobsConfig(rollouts=tmp / "rollouts", teacher=tmp, out=tmp / "out", k=k, codec=codec,
                                    engine=EngineConfig(name="vllm", score_tokens_per_call=budget,
                                                        score_logprobs_per_call=logprobs_budget))
        engine = VLLMEngine.__new__(VLLMEngine)
        engine.cfg, engine.llm, engine._pool = cfg.engine, _StandInLLM(vocab, k), None
        engine.max_logprobs, engine.vocab_size, engine.max_model_len = k, vocab, length + 1
        out = ShardSet.create(cfg.out, "teacher_topk", codec_info(codec, k, vocab))
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        encode = partial(encode_records, codec=codec, k=k, vocab_size=vocab)
        totals, _ = _score_shards(engine, cfg, rollouts, out, [0], None, encode, show_progress=False)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        shard_mb = out.manifest["totals"]["bytes"] / 2**20
    return {"k": k, "codec": codec, "rows": rows, "tokens_per_row": length, "response_tokens": totals["tokens"],
            "score_tokens_per_call": budget, "score_logprobs_per_call": logprobs_budget,
            "tokens_per_call": score_tokens_per_call(cfg.engine, k), "peak_rss_mb": round(peak, 1),
            "rss_before_scoring_mb": round(baseline, 1), "shard_mb": round(shard_mb, 1), "seconds": round(seconds, 1)}


def extraction_memory_peak(k: int, rows: int = 1024, length: int = 4096, budget: int | None = None,
                           codec: str = "compact", logprobs_budget: int | None = None) -> dict[str, Any]:
    """Host-memory peak (max RSS of a fresh process) of scoring one rows x length-token shard; see
    ``_scoring_memory_worker``. ``budget``: score_tokens_per_call, ``logprobs_budget``: score_logprobs_per_call
    (defaults: EngineConfig's)."""
    import json
    import subprocess
    import sys

    budget = budget or EngineConfig().score_tokens_per_call
    logprobs_budget = logprobs_budget or EngineConfig().score_logprobs_per_call
    code = ("import json; from pipeline.bench.stages import _scoring_memory_worker as w; "
            f"print(json.dumps(w({k}, {rows}, {length}, {budget}, {codec!r}, {logprobs_budget})))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"scoring-memory worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_train(steps: int = 20, batch_size: int = 64) -> dict[str, Any]:
    """Offline OPD (batches streamed from shards) vs online OPD (student samples, live teacher scores every
    step): tokens/s of training on the same demo-size model pair, loss and batch shape."""
    from pipeline.prompts import PromptRecord, write_prompts_jsonl
    from pipeline.stages.sampling import run_rollouts
    from pipeline.stages.teacher_logprobs import run_teacher_logprobs
    from pipeline.stages.train import run_online_train, run_train
    from pipeline.tasks.arithmetic import make_problems

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        models = _demo_models(tmp)
        prompts = tmp / "prompts.jsonl"
        write_prompts_jsonl([PromptRecord(p.id, p.prompt, p.answer) for p in make_problems(256, 3, seed=0)], prompts)
        sampling = SamplingConfig(n=4, max_new_tokens=32)
        t0 = time.perf_counter()
        run_rollouts(RolloutsConfig(prompts=prompts, student=models["student"], out=tmp / "rollouts",
                                    sampling=sampling), show_progress=False)
        t1 = time.perf_counter()
        # untrained demo models carry no SFT provenance: the consistency guard is not what is measured here
        run_teacher_logprobs(TeacherLogprobsConfig(rollouts=tmp / "rollouts", teacher=models["teacher"],
                                                   out=tmp / "shards", k=8, allow_teacher_mismatch=True),
                             show_progress=False)
        t2 = time.perf_counter()
        common = dict(student=models["student"], shards=tmp / "shards", steps=steps, batch_size=batch_size,
                      checkpoint_every=10**6, log_every=steps, losses={"reverse_kl_topk": 1.0})
        off = run_train(TrainConfig(out=tmp / "off", **common), show_progress=False)
        online = OnlineConfig(teacher=models["teacher"], prompts=prompts, sampling=sampling, k=8)
        on = run_online_train(TrainConfig(out=tmp / "on", online=online, **common), show_progress=False)
        rows = {name: read_metrics(tmp / name / "metrics.jsonl")[-1] for name in ("off", "on")}
    off_tps = rows["off"]["progress/tokens"] / rows["off"]["perf/train_seconds"]
    on_tps = rows["on"]["progress/tokens"] / rows["on"]["perf/train_seconds"]
    return {"bench": "train", "steps": steps, "batch_size": batch_size, "loss": "reverse_kl_topk",
            "tokens_per_s_offline": round(off_tps, 1), "tokens_per_s_online": round(on_tps, 1),
            "speedup": round(off_tps / on_tps, 2),
            "online_seconds_sampling": rows["on"].get("perf/sample_seconds"),
            "online_seconds_scoring": rows["on"].get("perf/score_seconds"),
            "offline_precompute_seconds": {"rollouts": round(t1 - t0, 2), "teacher_logprobs": round(t2 - t1, 2)},
            "offline_train_seconds": off.summary.get("train_seconds"),
            "online_train_seconds": on.summary.get("train_seconds")}


def bench_data_stall(ks: tuple[int, ...] = (20, 128), rows: int = 24, rows_per_step: int = 4,
                     length: int = 4096, consumer_tokens_per_s: float = 7500.0, depth: int = 2) -> dict[str, Any]:
    """The trainer's data wait on long rollouts (``length`` tokens, Qwen3's vocabulary, compact shards, one row
    per row group): ``ShardBatches`` as ``run_train`` builds it (decode, split into micro-batches, collate; on the
    prefetch thread ``depth`` steps ahead, or inside the step with depth 0) feeding a consumer whose step takes
    (response tokens / ``consumer_tokens_per_s``) seconds, a sleep that releases the GIL as GPU work does.

        stall_fraction = wait / (wait + work),   wait: time in ``next_micro_batches``, work: the sleeps

    Per k: the stall without and with prefetch, and ``prepare_tokens_per_s`` (decode + split + collate on one
    thread, from the synchronous run's wait). One epoch of ``rows`` rows in steps of ``rows_per_step``."""
    from pipeline.train.distributed import DistInfo
    from pipeline.train.sources import ShardBatches
    from storage.bench import LONG_ROW_VOCAB, long_row_records, paced_consumer, truncate_k
    from storage.codecs import codec_info, encode_records
    from storage.shardset import ShardSet

    out = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        # two generated rows (17 s each: the generator draws full-vocabulary distributions), repeated: decoding
        # and collating cost the same per row whatever the row
        base = long_row_records(max(ks), 2, length=length)
        source = [dataclasses.replace(base[i % 2], prompt_id=f"p{i}", sample_index=0) for i in range(rows)]
        for k in ks:
            records = truncate_k(source, k)
            shards = ShardSet.create(tmp / f"k{k}", "teacher_topk", codec_info("compact", k, LONG_ROW_VOCAB))
            shards.write_shard(0, encode_records(records, "compact", k, LONG_ROW_VOCAB), row_group_size=1)
            shards.finalize(expected_shards=1)
            row: dict[str, Any] = {"k": k, "rows": rows, "row_tokens": length, "rows_per_step": rows_per_step}
            for d in (0, depth):
                cfg = TrainConfig(student="unused", shards=shards.root, out="unused", batch_size=rows_per_step,
                                  shuffle_buffer=1, prefetch_batches=d, losses={"reverse_kl_topk": 1.0})
                batches = ShardBatches(cfg, DistInfo(), rows_per_step, None, pad_id=0)
                try:
                    steps = (batches.next_micro_batches(rows_per_step, 1) for _ in range(rows // rows_per_step))
                    waits, tokens = paced_consumer(steps, lambda step: sum(int(b.mask_B_T.sum()) for b in step),
                                                   consumer_tokens_per_s)
                finally:
                    batches.close()
                waits = waits[:-1]  # the end of this finite stream is not a wait of the trainer's
                works = [n / consumer_tokens_per_s for n in tokens]
                suffix = "" if d == 0 else "_prefetch"
                row[f"stall_fraction{suffix}"] = round(sum(waits) / (sum(waits) + sum(works)), 4)
                # the first step waits for its own data whatever runs ahead: the steady state is the rest
                row[f"stall_fraction{suffix}_after_first_step"] = round(
                    sum(waits[1:]) / max(sum(waits[1:]) + sum(works[1:]), 1e-9), 4)
                if d == 0:
                    row["prepare_tokens_per_s"] = round(sum(works) * consumer_tokens_per_s / sum(waits), 1)
            out.append(row)
    return {"bench": "data-stall", "consumer_tokens_per_s": consumer_tokens_per_s, "prefetch_depth": depth,
            "cases": out}
