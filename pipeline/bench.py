"""Benchmarks that print one JSON object (`lopd bench extract`, `lopd bench train`). Figures are ratios
measured side by side in one process; absolute times on shared machines mean little."""

from __future__ import annotations

import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import (DemoConfig, EngineConfig, OnlineConfig, RolloutsConfig, SamplingConfig,
                             TeacherLogprobsConfig, TrainConfig)
from pipeline.demo_world import make_models
from pipeline.training import read_metrics


def _demo_models(tmp: Path) -> dict[str, Path]:
    demo = DemoConfig()
    return make_models(tmp / "models", demo.teacher, demo.student, seed=0)


def bench_extract(engine: str = "hf", model_dir: Path | None = None, sequences: int = 512, length: int = 40,
                  prompt_len: int = 9, k: int = 8, repeats: int = 3, codec: str = "compact",
                  shards: int = 4) -> dict[str, Any]:
    """Teacher scoring throughput: bare engine scoring vs the stage's full write path (top-k records, codec,
    Parquet shard write behind the next shard's scoring, as in ``teacher_logprobs``), on the same
    ``shards`` batches, alternating the two ``repeats`` times and taking medians."""
    from pipeline.engines.base import make_engine
    from pipeline.models import load_tokenizer
    from storage.codecs import encode_records
    from storage.records import TeacherRecord
    from storage.shardset import ShardSet, WriteBehind

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model_dir = model_dir or _demo_models(tmp)["teacher"]
        vocab = len(load_tokenizer(model_dir))
        rng = np.random.default_rng(0)
        seqs = [rng.integers(4, vocab, size=length).tolist() for _ in range(sequences)]
        per_shard = -(-sequences // shards)
        pieces = [seqs[i : i + per_shard] for i in range(0, sequences, per_shard)]
        eng = make_engine(str(model_dir), EngineConfig(name=engine, batch_size=256), max_logprobs=k)
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
        eng.close()
    tokens = sequences * (length - prompt_len)
    b, f = statistics.median(bare), statistics.median(full)
    return {"bench": "extract", "engine": engine, "model": str(model_dir), "sequences": sequences,
            "response_tokens": tokens, "k": k, "codec": codec, "shards": len(pieces), "repeats": repeats,
            "tokens_per_s_bare": round(tokens / b, 1), "tokens_per_s_with_write": round(tokens / f, 1),
            "overhead_ratio": round(f / b - 1.0, 4)}


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
            "offline_train_seconds": off.summary.get("train_seconds"), "online_train_seconds": on.summary.get("train_seconds")}
