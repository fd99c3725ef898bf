"""STAGE"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import TOPK_LOSSES, MethodsConfig, TrainConfig
from pipeline.fingerprint import check_shard_teacher, model_fingerprint, read_provenance, shard_data_fingerprint
from pipeline.models import load_tokenizer
from pipeline.progress import log
from pipeline.stages.common import StageResult, require_model_dir, require_shard_set
from pipeline.stages.evaluate import training_evaluation
from pipeline.tracking import check_installed, open_trackers
from pipeline.train import checkpoint
from pipeline.train.distributed import seed_everything, setup_distributed
from pipeline.train.loop import CheckpointPlan, EvalHook, check_launch, run_loop, start_run
from pipeline.train.metrics import MetricsWriter, plot_metrics
from pipeline.train.objective import OpdObjective, gopd_reference_needed, gopd_reference_path
from pipeline.train.sources import BatchSource, MixedShardBatches, OnlineBatches, ShardBatches, StepBatches
from pipeline.train.student import (
    load_student,
    prepare_reference,
    prepare_student,
    save_trained_model,
    unwrap,
)
from pipeline.train.weighting import RolloutTable
from storage.errors import LopdUserError
from storage.prompt_stats import load_prompt_stats, require_group_stats
from storage.reader import ReaderState
from storage.shardset import ShardSet, file_sha256

# Settings that do not change what a run computes (outputs, cadence, how it is spread over devices, the chunk
# size of the LM head, timeouts); everything else must match for a checkpoint to be resumed.
_NOT_IN_RUN_KEY = ({"out", "student", "shards", "steps", "checkpoint_every", "keep_checkpoints", "log_every", "online",
                    "eval", "report_to", "run_name"}
                   | TrainConfig.EXECUTION_ONLY)

# Method settings whose default (off) is left out of the run key; when set they are part of it.
_OFF_BY_DEFAULT = {"loss_schedule": [], "rows": {}, "methods": MethodsConfig().model_dump(mode="json"),
                   "akl_head_mass": 0.5, "alpha_divergence": 0.2, "kdrl_beta": 5e-3, "kdrl_is_cap": 2.0,
                   "weight_norm": "count"}


# Bumped when a method's objective changes under unchanged settings (2: TIP's soft-OR an OR, BAPO's released
# balance, KDRL's sample std, Clip-Cov's exclusion of clipped tokens).
METHOD_DEFINITIONS = 2


def train_run_key(cfg: TrainConfig, student_fingerprint: str, data_fingerprint: str | None) -> str:
    """The run's identity: content fingerprints of the start model and the data (shards, or the online
    teacher and prompts), and the optimisation settings. Paths are provenance only: a moved run resumes."""
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_IN_RUN_KEY}
    for name, off in _OFF_BY_DEFAULT.items():  # unset methods leave the key of a run from before them unchanged
        if settings[name] == off:
            del settings[name]
    gopd = settings.get("methods", {}).get("gopd")
    if gopd is not None:  # the reference model by content (a moved one resumes); the default keeps older keys
        reference = gopd.pop("reference")
        if reference is not None:
            gopd["reference_fingerprint"] = model_fingerprint(reference)
    if cfg.online is not None:
        settings["online"] = {k: v for k, v in cfg.online.model_dump(mode="json").items()
                              if k not in ("teacher", "prompts")}
    m = cfg.methods
    if any(x is not None for x in (m.tip, m.bapo, m.cov)):
        # they select or bound tokens per micro-batch, so the grouping is part of what they compute: grad_accum and
        # max_tokens_per_micro_batch are in the key already, the world size is checked on resume, and packing (how
        # the token budget counts) joins them here (docs/methods.md, "Statistics global to the step")
        settings["grouping"] = {"packing": cfg.packing}
    if any(x is not None for x in (m.tip, m.bapo, m.cov)) or "kdrl" in cfg.all_losses():
        # their definitions changed to the papers' released rules (docs/methods.md): an older checkpoint of the same
        # settings trained another objective and must not be resumed
        settings["method_definitions"] = METHOD_DEFINITIONS
    return checkpoint.run_fingerprint({"settings": settings, "student": student_fingerprint, "data": data_fingerprint})


def run_train(cfg: TrainConfig, show_progress: bool = True, eval_hook: EvalHook | None = None,
              eval_every: int | None = None, stop_after: int | None = None) -> StageResult:
    """Offline OPD: train ``cfg.steps`` optimiser steps on the teacher shards ``cfg.shards`` (resuming from
    ``cfg.out/ckpt`` if present). ``cfg.online`` is not read here (see ``run_online_train``).

    ``eval_hook`` (the demo's accuracy probe) runs every ``eval_every`` steps; its time is excluded from
    ``perf/train_seconds``. ``stop_after`` ends the process's work early (tests use it to simulate a kill).
    """
    require_model_dir(cfg.student, field="train.student", made_by="lopd sft")
    sources = cfg.sources()
    several = len(sources) > 1
    sets = {src.label: require_shard_set(src.path, kind="teacher_topk", made_by="lopd teacher-logprobs",
                                         field=f"train.shards[{src.label}]" if several else "train.shards")
            for src in sources}
    needed_topk = cfg.all_losses() & TOPK_LOSSES
    relations = {}
    for label, shards in sets.items():
        where = f"train.shards source {label!r} ({shards.root})" if several else str(shards.root)
        if needed_topk and not shards.metadata.get("k"):
            raise LopdUserError(f"{where}: losses {sorted(needed_topk)} need top-k shards (these store k=0: the "
                                "sampled token's log-prob only); use the `lightning` loss or extract with k > 0")
        relations[label] = check_shard_teacher(shards.metadata, where)
    metas = {label: shards.metadata for label, shards in sets.items()}
    provenance = {"opd_teacher_fingerprint": None, "teacher_mismatch_allowed": None, "self_distillation": None}
    if not several:
        (label, shards), = sets.items()
        data_fingerprint = shard_data_fingerprint(shards.manifest)
        provenance = {"opd_teacher_fingerprint": shards.metadata.get("teacher_fingerprint"),
                      "teacher_mismatch_allowed": shards.metadata.get("teacher_mismatch_allowed"),
                      "self_distillation": relations[label] == "self_distillation"}
        rollouts = rollout_table(cfg, shards, data_fingerprint)
    else:
        check_sources_agree(cfg, sets, bool(needed_topk))
        data_fingerprint = checkpoint.run_fingerprint({"sources": [
            {"name": src.label, "weight": src.weight, "data": shard_data_fingerprint(sets[src.label].manifest)}
            for src in sources]})
        provenance["sources"] = {src.label: {
            "weight": src.weight, "teacher_fingerprint": metas[src.label].get("teacher_fingerprint"),
            "teacher_relation": relations[src.label]} for src in sources}
        rollouts = mixed_rollout_table(cfg, sets)
    return _train(cfg, "offline", data_fingerprint, metas, provenance, show_progress, eval_hook, eval_every,
                  stop_after, rollouts=rollouts)


def check_sources_agree(cfg: TrainConfig, sets: dict[str, ShardSet], need_topk: bool) -> None:
    """Several shard sets can share a step only if their records collate and their ids index one vocabulary: the
    same vocabulary size (each set's extraction checked its teacher's vocabulary against its rollouts' student),
    one k when a loss reads the top-k."""
    vocab = {label: s.metadata.get("vocab_size") for label, s in sets.items()}
    if len(set(vocab.values())) > 1:
        raise LopdUserError(f"train.shards: the sources index vocabularies of different sizes {vocab}; token ids "
                            "of one would not be the student's in another: mix sets of one model family")
    ks = {label: s.metadata.get("k") for label, s in sets.items()}
    if need_topk and len(set(ks.values())) > 1:
        raise LopdUserError(f"train.shards: the top-k losses need one k over the sources, got {ks}; extract them "
                            "with the same teacher_logprobs.k or train with the `lightning` loss")


def rollout_table(cfg: TrainConfig, shards: ShardSet, data_fingerprint: str) -> RolloutTable | None:
    """The shard set's prompt statistics when a method or a routing reads them (computed once, stored beside
    the shards as ``prompt_stats.parquet``, reused while the set is unchanged); None otherwise. Refused when a
    reward is missing, or when a prompt has fewer than 2 rollouts and a method compares a prompt's rollouts."""
    if not cfg.needs_prompt_stats():
        return None
    table, how = load_prompt_stats(shards, data_fingerprint)
    routed = [name for name in sorted(cfg.all_losses()) if cfg.route(name) != "all"]
    users = ([f"train.rows.{name}={cfg.route(name)}" if name in cfg.rows else f"{name} (on {cfg.route(name)} rows)"
              for name in routed]
             + [f"train.methods.{name}" for name in ("paced", "scope") if getattr(cfg.methods, name) is not None]
             + (["the kdrl loss (group-normalised rewards)"] if "kdrl" in cfg.all_losses() else []))
    group_users = [u for u in users if "solved" in u or u.endswith(("paced", "scope", "rewards)"))]
    require_group_stats(table, shards.root, groups=bool(group_users), why=", ".join(group_users or users))
    log.info("train: prompt statistics of %s: %s", shards.root, how)
    scope = cfg.methods.scope
    return RolloutTable.from_table(table, None if scope is None else (scope.tau, scope.student_ppl_sign))


def mixed_rollout_table(cfg: TrainConfig, sets: dict[str, ShardSet]) -> RolloutTable | None:
    """Several shard sets' prompt statistics (``rollout_table`` of each, computed and stored beside it, refused
    naming its directory) as one table keyed as ``MixedShardBatches`` tags its records: a prompt's group is never
    spread over sets, and sets may reuse prompt ids. None when no method reads them."""
    if not cfg.needs_prompt_stats():
        return None
    return RolloutTable.merge({label: rollout_table(cfg, shards, shard_data_fingerprint(shards.manifest))
                               for label, shards in sets.items()})


def run_online_train(cfg: TrainConfig, show_progress: bool = True, eval_hook: EvalHook | None = None,
                     eval_every: int | None = None, stop_after: int | None = None) -> StageResult:
    """The online OPD baseline: each step the current student samples fresh rollouts and the live teacher
    ``cfg.online.teacher`` scores them; same losses, loop and checkpoints as ``run_train``."""
    if cfg.online is None:
        raise LopdUserError("online OPD needs a train.online section (teacher, prompts) in the run config")
    if cfg.needs_prompt_stats():
        raise LopdUserError("row routing (train.rows, the anchors), train.methods.paced, train.methods.scope and "
                            "the kdrl loss read the prompt statistics of a shard set: offline training only "
                            "(`lopd train`), not the online baseline")
    require_model_dir(cfg.student, field="train.student", made_by="lopd sft")
    require_model_dir(cfg.online.teacher, field="train.online.teacher")
    data = {"teacher": model_fingerprint(cfg.online.teacher), "prompts": file_sha256(Path(cfg.online.prompts))}
    return _train(cfg, "online", checkpoint.run_fingerprint(data), {},
                  {"opd_teacher_fingerprint": None, "teacher_mismatch_allowed": None}, show_progress, eval_hook,
                  eval_every, stop_after)


def _train(cfg: TrainConfig, mode: str, data_fingerprint: str, shard_metas: dict[str, dict[str, Any]],
           teacher_provenance: dict[str, Any], show_progress: bool, eval_hook: EvalHook | None,
           eval_every: int | None, stop_after: int | None, rollouts: RolloutTable | None = None) -> StageResult:
    out = Path(cfg.out)
    final_dir = out / "final"
    if gopd_reference_needed(cfg):
        require_model_dir(gopd_reference_path(cfg), field="train.methods.gopd.reference")
    student_fp = model_fingerprint(cfg.student)
    run_key = train_run_key(cfg, student_fp, data_fingerprint)
    if (final_dir / "lopd_provenance.json").exists():
        done = read_provenance(final_dir)
        if done.get("train_run_key") == run_key and done.get("steps") == cfg.steps:
            log.info("train: %s is complete (same config, %d steps); nothing to do", final_dir, cfg.steps)
            return StageResult("train", out, skipped=True, summary={"final_model": str(final_dir)})
    for label, meta in shard_metas.items():
        if meta.get("student_fingerprint") not in (None, student_fp):
            log.warning("train: shards %s were sampled from student %s but training starts from %s; the rollouts "
                        "are then off-policy for this student", label, meta.get("student_fingerprint"), student_fp)

    if eval_hook is None:
        eval_hook, eval_every = training_evaluation(cfg, "train")
    check_installed(cfg.report_to, "train")
    info = setup_distributed(cfg.dist_timeout_minutes)
    check_launch(cfg, info, field="train", online=mode == "online", eval_hook=bool(eval_hook and eval_every))
    local = cfg.batch_size // info.world_size
    if local // cfg.grad_accum < 1 or local * info.world_size != cfg.batch_size or local % cfg.grad_accum:
        raise LopdUserError(f"train.batch_size={cfg.batch_size} must be a multiple of grad_accum × world size "
                            f"= {cfg.grad_accum} × {info.world_size}")
    seed_everything(cfg.seed, cfg.deterministic)
    tokenizer = load_tokenizer(cfg.student)
    model = prepare_student(load_student(cfg.student, info, fsdp=cfg.fsdp, attn_implementation=cfg.attn_implementation),
                            info, fsdp=cfg.fsdp, precision=cfg.precision,
                            activation_checkpointing=cfg.activation_checkpointing, fsdp_shard_size=cfg.fsdp_shard_size)
    reference = None
    if gopd_reference_needed(cfg):
        reference = prepare_reference(gopd_reference_path(cfg), info, fsdp=cfg.fsdp, precision=cfg.precision,
                                      attn_implementation=cfg.attn_implementation)
        log.info("train: G-OPD reference policy (frozen) %s", gopd_reference_path(cfg))
    ckpt = CheckpointPlan(out / "ckpt", cfg.checkpoint_every, cfg.keep_checkpoints, run_key)
    run = start_run(model, info, cfg, cfg.optim, cfg.steps, ckpt, what="training")
    if run.resumed_world_size not in (None, info.world_size):
        # each rank's stream position is saved; another world size would see other sequences
        raise LopdUserError(f"{ckpt.root}: checkpoint was written by {run.resumed_world_size} process(es), this run "
                            f"has {info.world_size}; resume with --nproc-per-node {run.resumed_world_size} or use a "
                            "new train.out")
    saved = run.rank_state["source"] if run.rank_state else None
    source: BatchSource
    if mode == "online":
        source = OnlineBatches(cfg.online, unwrap(model), cfg.student, cfg.online.k, cfg.seed, rank=info.rank)
        if saved:
            source.load_state_dict(saved)
    elif len(cfg.sources()) > 1:
        source = MixedShardBatches(cfg, info, local // cfg.grad_accum, saved, tokenizer.pad_token_id, rollouts)
    else:
        source = ShardBatches(cfg, info, local // cfg.grad_accum,
                              ReaderState.from_dict(saved["reader"]) if saved and saved["reader"] else None,
                              tokenizer.pad_token_id, rollouts)

    with open_trackers(cfg.report_to if info.is_main else [], out, cfg.run_name or out.name,
                       cfg.model_dump(mode="json"), field="train", resume_step=run.start_step) as tracker:
        metrics = MetricsWriter(out / "metrics.jsonl", enabled=info.is_main, resume_step=run.start_step,
                                tracker=tracker)
        last, step = run_loop(run, OpdObjective(cfg, rollouts, reference),
                              StepBatches(source, cfg, local, tokenizer.pad_token_id, rollouts), cfg, steps=cfg.steps,
                              grad_clip=cfg.optim.grad_clip, log_every=cfg.log_every, metrics=metrics, ckpt=ckpt,
                              description=f"train ({mode} OPD)", show_progress=show_progress, eval_hook=eval_hook,
                              eval_every=eval_every, stop_after=stop_after)
    if step < cfg.steps:
        return StageResult("train", out, summary={"stopped_at": step})

    provenance = {**read_provenance(cfg.student), "stage": "train", "train_run_key": run_key, "steps": cfg.steps,
                  **teacher_provenance, "online": mode == "online"}
    save_trained_model(model, cfg.fsdp, info, cfg.student, tokenizer, final_dir, provenance, cfg.precision)
    if info.is_main:  # plot_metrics skips the PNG where matplotlib is missing (a bare GPU image)
        # titled by the losses, so a top-k run is never read as the published Lightning loss
        plot_metrics(out / "metrics.jsonl", out / "curves.png",
                     title=f"{mode} OPD: {' + '.join(name for name, w in cfg.losses.items() if w)}")
    if info.world_size > 1:
        torch.distributed.barrier()
    meter = run.meter
    log.info("train: %d steps, %.1fs of training, %d tokens -> %s", cfg.steps, meter.seconds, meter.tokens, final_dir)
    return StageResult("train", out, wall_seconds=meter.seconds,
                       summary={"final_model": str(final_dir), "train_seconds": meter.seconds, "last": last})
