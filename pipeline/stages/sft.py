"""Stage 1b: supervised fine-tuning of the student on the teacher's answers (loss on response tokens only).

The output model directory is stamped (``lopd_provenance.json``) with the fingerprint of the teacher that
wrote the SFT data: the teacher-consistency check of stage 3 reads it.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from typing import Iterator

import numpy as np
import torch

from pipeline.config import SftConfig
from pipeline.fingerprint import model_fingerprint, read_provenance
from pipeline.models import load_model, load_tokenizer
from pipeline.stages.common import StageResult, log, timed
from pipeline.training import (Example, MetricsWriter, device_for, latest_checkpoint_step, plot_metrics,
                               save_trained_model, seed_everything, setup_distributed, sft_train, wrap_model)
from storage.shardset import ShardSet


def iter_shard_examples(shardset: ShardSet, seed: int) -> Iterator[Example]:
    """Endless stream of (token_ids, prompt_len): shards in a new random order each epoch, rows shuffled
    within a shard. Memory holds one shard's token columns at a time."""
    indices = shardset.complete_indices()
    if not indices:
        raise FileNotFoundError(f"{shardset.root}: no complete shards to train on; run the previous stage first")
    rng = random.Random(seed)
    while True:
        order = indices[:]
        rng.shuffle(order)
        for i in order:
            table = shardset.read_shard(i, columns=["token_ids", "prompt_len"])
            ids = table.column("token_ids").to_pylist()
            plens = table.column("prompt_len").to_pylist()
            rows = list(range(len(ids)))
            rng.shuffle(rows)
            for r in rows:
                yield np.asarray(ids[r], dtype=np.int64), plens[r]


def sft_run_key(provenance: dict, data_manifest: dict) -> str:
    """What a resumable checkpoint must match: data (its manifest), base model and the config that shapes the
    optimisation (not ``out``, logging or checkpoint cadence)."""
    config = {k: v for k, v in provenance["config"].items()
              if k not in ("out", "log_every", "checkpoint_every", "keep_checkpoints", "fsdp")}
    payload = {**provenance, "config": config, "data_manifest": data_manifest}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_sft(cfg: SftConfig, show_progress: bool = True) -> StageResult:
    """Fine-tune ``cfg.student`` on the SFT samples in ``cfg.data``; write an HF dir at ``cfg.out``."""
    data = ShardSet.open(cfg.data)
    teacher_fp = data.metadata.get("teacher_fingerprint")
    provenance = {
        "stage": "sft", "sft_teacher_fingerprint": teacher_fp, "sft_data": str(cfg.data),
        "base_model_fingerprint": model_fingerprint(cfg.student), "config": cfg.model_dump(mode="json"),
    }
    done = read_provenance(cfg.out)
    if done and {k: done.get(k) for k in provenance} == provenance:
        log.info("sft: %s is complete (same data, base model and config); nothing to do", cfg.out)
        return StageResult("sft", cfg.out, skipped=True, summary={"sft_teacher_fingerprint": teacher_fp})
    info = setup_distributed()
    if cfg.batch_size % info.world_size:
        raise ValueError(f"sft.batch_size={cfg.batch_size} must be a multiple of the world size {info.world_size}")
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.student)
    model = wrap_model(load_model(cfg.student).to(device_for(info)), info, cfg.fsdp)
    logs = cfg.out.with_name(cfg.out.name + "_logs")
    ckpt_root = logs / "ckpt"
    metrics = MetricsWriter(logs / "metrics.jsonl", enabled=info.is_main, resume_step=latest_checkpoint_step(ckpt_root))
    with timed() as t:
        last = sft_train(model, iter_shard_examples(data, cfg.seed), steps=cfg.steps, batch_size=cfg.batch_size,
                         optim=cfg.optim, pad_id=tokenizer.pad_token_id, metrics=metrics,
                         log_every=cfg.log_every, show_progress=show_progress, ckpt_root=ckpt_root,
                         checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
                         run_key=sft_run_key(provenance, data.manifest), info=info, fsdp=cfg.fsdp)
    save_trained_model(model, cfg.fsdp, info, cfg.student, tokenizer, cfg.out, provenance)
    if info.is_main:
        shutil.rmtree(ckpt_root, ignore_errors=True)  # the final model dir is the durable result
        plot_metrics(metrics.path, metrics.path.with_name("sft_curves.png"), ["loss/sft", "optim/lr"], "SFT")
    if info.world_size > 1:
        torch.distributed.barrier()
    log.info("sft: %d steps in %.1fs, final loss %.4f -> %s", cfg.steps, t["seconds"], last.get("loss/sft", float("nan")), cfg.out)
    return StageResult("sft", cfg.out, wall_seconds=t["seconds"],
                       summary={"final_loss": last.get("loss/sft"), "sft_teacher_fingerprint": teacher_fp})
