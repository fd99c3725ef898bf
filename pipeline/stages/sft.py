"""Stage 1b: supervised fine-tuning of the student on the teacher's answers (loss on response tokens only).

The output model directory is stamped (``lopd_provenance.json``) with the fingerprint of the teacher that
wrote the SFT data: the teacher-consistency check of stage 3 reads it.
"""

from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch

from pipeline.config import SftConfig
from pipeline.fingerprint import model_fingerprint, read_provenance, shard_data_fingerprint
from pipeline.models import load_tokenizer
from pipeline.progress import log
from pipeline.stages.common import StageResult, require_model_dir, require_shard_set, timed
from pipeline.stages.evaluate import training_evaluation
from pipeline.tracking import check_installed, open_trackers
from pipeline.train import checkpoint
from pipeline.train.batching import Example
from pipeline.train.distributed import seed_everything, setup_distributed
from pipeline.train.loop import CheckpointPlan, check_launch, run_loop, start_run
from pipeline.train.metrics import MetricsWriter, plot_metrics
from pipeline.train.objective import SftObjective
from pipeline.train.sources import ExampleBatches
from pipeline.train.student import load_student, prepare_student, save_trained_model
from storage.errors import LopdUserError
from storage.shardset import ShardSet


def iter_shard_examples(shardset: ShardSet, seed: int, max_seq_len: int | None = None,
                        overlong: str = "error") -> Iterator[Example]:
    """Endless stream of (token_ids, prompt_len): shards in a new random order each epoch, rows shuffled
    within a shard. Memory holds one shard's token columns at a time. An example longer than ``max_seq_len``
    stops the run with an error naming it (``overlong="error"``) or has its answer cut (``"truncate"``)."""
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
                tokens = np.asarray(ids[r], dtype=np.int64)
                if max_seq_len is not None and len(tokens) > max_seq_len:
                    if overlong == "error" or plens[r] >= max_seq_len:
                        raise LopdUserError(
                            f"{shardset.shard_path(i)}: row {r} has {len(tokens)} tokens (prompt {plens[r]}), more "
                            f"than sft.max_seq_len={max_seq_len}; raise sft.max_seq_len or set sft.overlong=truncate "
                            "to cut answers")
                    tokens = tokens[:max_seq_len]
                yield tokens, plens[r]


# Settings that do not change what a run computes: paths, logging and checkpoint cadence, how it is launched.
_NOT_IN_RUN_KEY = ({"out", "student", "data", "log_every", "checkpoint_every", "keep_checkpoints", "grad_accum",
                    "deterministic", "eval", "report_to", "run_name"} | SftConfig.EXECUTION_ONLY)


def sft_identity(cfg: SftConfig, teacher_fp: str | None, base_fp: str, data_manifest: dict) -> dict:
    """What makes an SFT run this run: content fingerprints of the data and base model, and the settings
    that shape the optimisation. Paths are not part of it: a moved run directory resumes."""
    config = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_IN_RUN_KEY}
    return {"stage": "sft", "sft_teacher_fingerprint": teacher_fp, "base_model_fingerprint": base_fp,
            "config": config, "data_fingerprint": shard_data_fingerprint(data_manifest)}


def run_sft(cfg: SftConfig, show_progress: bool = True) -> StageResult:
    """Fine-tune ``cfg.student`` on the SFT samples in ``cfg.data``; write an HF dir at ``cfg.out``."""
    require_model_dir(cfg.student, field="sft.student")
    data = require_shard_set(cfg.data, kind="samples", field="sft.data", made_by="lopd teacher-sft-data")
    teacher_fp = data.metadata.get("teacher_fingerprint")
    identity = sft_identity(cfg, teacher_fp, model_fingerprint(cfg.student), data.manifest)
    run_key = checkpoint.run_fingerprint(identity)
    provenance = {**identity, "sft_run_key": run_key, "sft_data": str(cfg.data)}  # the path: provenance only
    done = read_provenance(cfg.out)
    if done and done.get("sft_run_key") == run_key:
        log.info("sft: %s is complete (same data, base model and config); nothing to do", cfg.out)
        return StageResult("sft", cfg.out, skipped=True, summary={"sft_teacher_fingerprint": teacher_fp})
    eval_hook, eval_every = training_evaluation(cfg, "sft")
    check_installed(cfg.report_to, "sft")
    info = setup_distributed(cfg.dist_timeout_minutes)
    check_launch(cfg, info, field="sft", eval_hook=eval_hook is not None)
    if cfg.batch_size % (info.world_size * cfg.grad_accum):
        raise LopdUserError(f"sft.batch_size={cfg.batch_size} must be a multiple of grad_accum × world size "
                            f"= {cfg.grad_accum} × {info.world_size}")
    seed_everything(cfg.seed, cfg.deterministic)
    tokenizer = load_tokenizer(cfg.student)
    lm = load_student(cfg.student, info, fsdp=cfg.fsdp, attn_implementation=cfg.attn_implementation)
    model = prepare_student(lm, info, fsdp=cfg.fsdp, precision=cfg.precision,
                            activation_checkpointing=cfg.activation_checkpointing, fsdp_shard_size=cfg.fsdp_shard_size)
    logs = cfg.out.with_name(cfg.out.name + "_logs")
    # the SFT stream's position is global (steps x batch size): its checkpoints resume under another world size
    ckpt = CheckpointPlan(logs / "ckpt", cfg.checkpoint_every, cfg.keep_checkpoints, run_key, at_end=False)
    run = start_run(model, info, cfg, cfg.optim, cfg.steps, ckpt, what="SFT")
    tracker = open_trackers(cfg.report_to if info.is_main else [], logs, cfg.run_name or cfg.out.name,
                            cfg.model_dump(mode="json"), field="sft", resume_step=run.start_step)
    metrics = MetricsWriter(logs / "metrics.jsonl", enabled=info.is_main, resume_step=run.start_step, tracker=tracker)
    source = ExampleBatches(iter_shard_examples(data, cfg.seed, cfg.max_seq_len, cfg.overlong), cfg, cfg.batch_size,
                            tokenizer.pad_token_id, info, start_step=run.start_step)
    with timed() as t, tracker:
        last, _ = run_loop(run, SftObjective(cfg.logits_chunk_tokens, cfg.packing), source, cfg, steps=cfg.steps,
                           grad_clip=cfg.optim.grad_clip, log_every=cfg.log_every, metrics=metrics, ckpt=ckpt,
                           description="sft", show_progress=show_progress, loss_key="loss/sft",
                           eval_hook=eval_hook, eval_every=eval_every)
    save_trained_model(model, cfg.fsdp, info, cfg.student, tokenizer, cfg.out, provenance, cfg.precision)
    if info.is_main:
        checkpoint.prune_all(ckpt.root)  # the final model dir is the durable result
        plot_metrics(metrics.path, metrics.path.with_name("sft_curves.png"), ["loss/sft", "optim/lr"], "SFT")
    if info.world_size > 1:
        torch.distributed.barrier()
    log.info("sft: %d steps in %.1fs, final loss %.4f -> %s", cfg.steps, t["seconds"],
             last.get("loss/sft", float("nan")), cfg.out)
    return StageResult("sft", cfg.out, wall_seconds=t["seconds"],
                       summary={"final_loss": last.get("loss/sft"), "sft_teacher_fingerprint": teacher_fp})
