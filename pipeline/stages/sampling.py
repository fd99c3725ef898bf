"""Stages 1 and 2 share one core: a model samples answers to prompts, shard by shard, into a ShardSet.

- ``run_teacher_sft_data``: the teacher answers the training prompts (SFT data, stamped with its fingerprint).
- ``run_rollouts``: the SFT student samples n rollouts per OPD prompt, once; the shards carry the behaviour
  log-probs, the sampling settings, the student's fingerprint and the teacher fingerprint of its SFT data.
A rerun skips complete shards and redoes only an incomplete one (each shard has its own seed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import (
    EngineConfig,
    PromptSource,
    RolloutsConfig,
    SamplingConfig,
    ShardParts,
    TeacherSftDataConfig,
)
from pipeline.engines import make_engine
from pipeline.fingerprint import model_fingerprint, read_provenance, tokenizer_fingerprint
from pipeline.models import encode_prompt, load_tokenizer
from pipeline.progress import log, progress_bar
from pipeline.prompts import PromptRecord, load_prompts, prompts_fingerprint
from pipeline.samples import SampleRow, rows_to_table
from pipeline.stages.common import StageResult, chunks, require_model_dir, shard_seed, timed
from pipeline.tasks.checkers import get_checker
from storage.shardset import ShardSet


def _sample_to_shards(
    *, stage: str, model_dir: Path, prompts: list[PromptRecord], out: Path, metadata: dict[str, Any],
    sampling: SamplingConfig, engine_cfg: EngineConfig, prompts_per_shard: int, checker_name: str | None,
    keep_only_correct: bool, use_chat_template: bool, parts: ShardParts, show_progress: bool = True,
) -> StageResult:
    shardset = ShardSet.create(out, kind="samples", metadata=metadata)
    pieces = chunks(len(prompts), prompts_per_shard)
    todo = [i for i in range(len(pieces)) if parts.mine(i) and not shardset.is_complete(i)]
    if not todo:
        log.info("%s: all %d shards complete in %s; nothing to do", stage, len(pieces), out)
        shardset.finalize(expected_shards=len(pieces))
        return StageResult(stage, out, skipped=True, summary={"shards": len(pieces), **_counts(shardset)})
    log.info("%s: %d of %d shards to write in %s", stage, len(todo), len(pieces), out)
    tokenizer = load_tokenizer(model_dir)
    checker = get_checker(checker_name) if checker_name else None
    engine = make_engine(str(model_dir), engine_cfg, seed=sampling.seed)
    stats = {"samples": 0, "kept": 0, "correct": 0, "truncated": 0, "response_tokens": 0}
    with timed() as t, progress_bar(not show_progress) as bar:
        task = bar.add_task(stage, total=len(todo), rate="")
        for i in todo:
            batch = [prompts[j] for j in pieces[i]]
            prompt_ids = [encode_prompt(tokenizer, p.prompt, use_chat_template, p.messages) for p in batch]
            gens = engine.generate(prompt_ids, sampling.model_copy(update={"seed": shard_seed(sampling.seed, i)}))
            rows = []
            for p, ids, samples in zip(batch, prompt_ids, gens):
                for s_idx, g in enumerate(samples):
                    text = tokenizer.decode(g.response_ids, skip_special_tokens=True)
                    reward = float(checker(text, p.answer)) if checker and p.answer is not None else None
                    stats["samples"] += 1
                    stats["correct"] += int(reward == 1.0)
                    stats["truncated"] += int(g.finish_reason == "length")
                    if keep_only_correct and reward != 1.0:
                        continue
                    stats["kept"] += 1
                    stats["response_tokens"] += len(g.response_ids)
                    rows.append(SampleRow(p.id, s_idx, ids + g.response_ids, len(ids), g.logprobs,
                                          g.finish_reason, reward, text))
            shardset.write_shard(i, rows_to_table(rows))
            bar.update(task, advance=1, rate=f"{stats['response_tokens'] / max(_elapsed(t), 1e-9):.0f} tok/s")
    engine.close()
    shardset.finalize(expected_shards=len(pieces))
    summary = {"shards": len(pieces), "shards_written": len(todo), **stats,
               "accuracy": stats["correct"] / stats["samples"] if checker and stats["samples"] else None}
    log.info("%s: wrote %d shards (%d samples, %d kept, %d hit max_new_tokens) in %.1fs",
             stage, len(todo), stats["samples"], stats["kept"], stats["truncated"], t["seconds"])
    return StageResult(stage, out, wall_seconds=t["seconds"], summary=summary)


def _elapsed(t: dict[str, float]) -> float:
    import time

    return time.perf_counter() - t["start"]


def _counts(shardset: ShardSet) -> dict[str, Any]:
    totals = shardset.manifest["totals"]
    return {"rows": totals.get("rows"), "tokens": totals.get("tokens")}


def _provenance(model_dir: Path, prompts: Path) -> dict[str, str]:
    """Where the inputs were read from: recorded, never compared on resume (the fingerprints are)."""
    return {"model_dir": str(Path(model_dir).resolve()), "prompts_file": str(Path(prompts).resolve())}


def _prompt_source(cfg: PromptSource) -> dict[str, Any]:
    """How the prompts were read, when not a plain file's own columns (only then: older shard sets keep their
    identity)."""
    if not cfg.prompt_fields and not Path(cfg.prompts).is_dir():  # type: ignore[attr-defined]
        return {}
    return {"prompt_fields": cfg.prompt_fields, "prompt_split": cfg.prompt_split}


def run_teacher_sft_data(cfg: TeacherSftDataConfig, show_progress: bool = True) -> StageResult:
    """Stage 1: the teacher answers the training prompts; output stamped with the teacher fingerprint."""
    require_model_dir(cfg.teacher, field="teacher_sft_data.teacher")
    prompts = load_prompts(cfg.prompts, cfg.limit, cfg.prompt_fields, cfg.prompt_split)
    teacher_fp = model_fingerprint(cfg.teacher)
    metadata = {
        "role": "teacher_sft_data", "teacher_fingerprint": teacher_fp, "model_fingerprint": teacher_fp,
        "tokenizer_fingerprint": tokenizer_fingerprint(cfg.teacher),
        "sampling": cfg.sampling.model_dump(), "engine": cfg.engine.name, "checker": cfg.checker,
        "keep_only_correct": cfg.keep_only_correct, "use_chat_template": cfg.use_chat_template,
        "prompts_per_shard": cfg.prompts_per_shard, "prompts_sha256": prompts_fingerprint(cfg.prompts)[:16],
        "limit": cfg.limit,
        "provenance": _provenance(cfg.teacher, cfg.prompts), **_prompt_source(cfg),
    }
    return _sample_to_shards(
        stage="teacher-sft-data", model_dir=cfg.teacher, prompts=prompts, out=cfg.out, metadata=metadata,
        sampling=cfg.sampling, engine_cfg=cfg.engine, prompts_per_shard=cfg.prompts_per_shard,
        checker_name=cfg.checker, keep_only_correct=cfg.keep_only_correct,
        use_chat_template=cfg.use_chat_template, parts=cfg, show_progress=show_progress,
    )


def run_rollouts(cfg: RolloutsConfig, show_progress: bool = True) -> StageResult:
    """Stage 2: the SFT student samples n rollouts per prompt, once (behaviour log-probs kept)."""
    require_model_dir(cfg.student, field="rollouts.student", made_by="lopd sft")
    prompts = load_prompts(cfg.prompts, cfg.limit, cfg.prompt_fields, cfg.prompt_split)
    provenance = read_provenance(cfg.student)
    student_fp = model_fingerprint(cfg.student)
    metadata = {
        "role": "rollouts", "student_fingerprint": student_fp, "model_fingerprint": student_fp,
        "sft_teacher_fingerprint": provenance.get("sft_teacher_fingerprint"),
        "tokenizer_fingerprint": tokenizer_fingerprint(cfg.student),
        "sampling": cfg.sampling.model_dump(), "engine": cfg.engine.name, "checker": cfg.checker,
        "use_chat_template": cfg.use_chat_template, "prompts_per_shard": cfg.prompts_per_shard,
        "prompts_sha256": prompts_fingerprint(cfg.prompts)[:16], "limit": cfg.limit,
        "provenance": _provenance(cfg.student, cfg.prompts), **_prompt_source(cfg),
    }
    if metadata["sft_teacher_fingerprint"] is None:
        log.warning("rollouts: %s has no lopd provenance; teacher consistency cannot be checked later", cfg.student)
    return _sample_to_shards(
        stage="rollouts", model_dir=cfg.student, prompts=prompts, out=cfg.out, metadata=metadata,
        sampling=cfg.sampling, engine_cfg=cfg.engine, prompts_per_shard=cfg.prompts_per_shard,
        checker_name=cfg.checker, keep_only_correct=False, use_chat_template=cfg.use_chat_template,
        parts=cfg, show_progress=show_progress,
    )
