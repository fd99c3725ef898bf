"""Stage 3: the teacher scores every rollout once, in large batches, into compressed top-k shards.

Output shard i holds the scores of rollouts shard i, so shards are the unit of work (resume, retries,
spreading over workers). Before any work: the teacher-consistency guard and the tokenizer check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import TeacherLogprobsConfig, score_tokens_per_call
from pipeline.engines import make_engine
from pipeline.engines.base import Engine, model_vocab_size, token_batches
from pipeline.fingerprint import (
    check_teacher_consistency,
    model_fingerprint,
    shard_set_fingerprint,
    tokenizer_fingerprint,
)
from pipeline.models import encode_prompt, load_tokenizer
from pipeline.progress import log, progress_bar
from pipeline.prompts import load_prompts
from pipeline.stages.common import StageResult, require_model_dir, require_shard_set, timed
from storage.codecs import codec_info, codec_params, encode_records
from storage.records import TeacherRecord
from storage.shardset import ShardSet, WriteBehind


class TokenizerMismatchError(ValueError):
    """Teacher and student tokenizers disagree: teacher top-k ids would not be student token ids."""


def check_tokenizers(teacher_dir: Path, student_dir: str | Path) -> None:
    """Same vocabulary and special-token ids, or a clear error before any work (chat templates may differ)."""
    if tokenizer_fingerprint(teacher_dir) == tokenizer_fingerprint(student_dir):
        return
    t, s = load_tokenizer(teacher_dir), load_tokenizer(student_dir)
    if t.get_vocab() != s.get_vocab():
        tv, sv = t.get_vocab(), s.get_vocab()
        diff = sorted(set(tv.items()) ^ set(sv.items()))[:5]
        raise TokenizerMismatchError(
            f"teacher {teacher_dir} and student {student_dir} have different vocabularies "
            f"({len(tv)} vs {len(sv)} tokens; first differences {diff}). Distillation over token ids needs "
            "one tokenizer: pick a teacher from the student's model family.")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(t, name) != getattr(s, name):
            raise TokenizerMismatchError(
                f"teacher {teacher_dir} and student {student_dir} disagree on {name}: "
                f"{getattr(t, name)} vs {getattr(s, name)}")
    log.warning("teacher and student tokenizers share the vocabulary but differ elsewhere (e.g. chat template); "
                "scoring reuses the sampled token ids, never re-renders text")


def score_table_rows(engine: Engine, rows: list[dict[str, Any]], k: int, teacher_prefix: dict[str, list[int]] | None,
                     max_seq_len: int | None, overlong: str, max_response_tokens: int | None = None
                     ) -> tuple[list[TeacherRecord], dict[str, int]]:
    """Score one shard of rollout rows. ``teacher_prefix`` maps prompt id -> the teacher's own prompt ids
    (privileged context); the stored record keeps the student's token ids. A response longer than
    ``max_response_tokens`` keeps its first that many tokens (``response_capped``), before ``max_seq_len``."""
    stats = {"truncated": 0, "skipped": 0, "response_capped": 0}
    keep, seqs, starts = [], [], []
    for row in rows:
        ids, plen = list(row["token_ids"]), row["prompt_len"]
        if max_response_tokens is not None and len(ids) - plen > max_response_tokens:
            ids = ids[: plen + max_response_tokens]
            stats["response_capped"] += 1
        prefix = teacher_prefix[row["prompt_id"]] if teacher_prefix else ids[:plen]
        if max_seq_len and len(prefix) + len(ids) - plen > max_seq_len:
            if overlong == "skip" or len(prefix) >= max_seq_len:
                stats["skipped"] += 1
                continue
            ids = ids[: plen + max_seq_len - len(prefix)]
            stats["truncated"] += 1
        keep.append((row, ids, plen))
        seqs.append(prefix + ids[plen:])
        starts.append(len(prefix))
    scored = engine.score(seqs, starts, k) if seqs else []
    records = []
    for (row, ids, plen), sc in zip(keep, scored):
        n = len(ids) - plen
        records.append(TeacherRecord(
            prompt_id=row["prompt_id"], sample_index=row["sample_index"],
            token_ids=np.asarray(ids, dtype=np.int32), prompt_len=plen,
            teacher_logprobs=sc.token_logprobs,
            behavior_logprobs=np.asarray(row["behavior_logprobs"][:n], dtype=np.float32),
            topk_ids=sc.topk_ids, topk_logprobs=sc.topk_logprobs, tail_logprob=sc.tail_logprob,
            reward=row["reward"],
        ))
    return records, stats


def run_teacher_logprobs(cfg: TeacherLogprobsConfig, show_progress: bool = True) -> StageResult:
    rollouts = require_shard_set(cfg.rollouts, kind="samples", field="teacher_logprobs.rollouts",
                                 made_by="lopd rollouts")
    require_model_dir(cfg.teacher, field="teacher_logprobs.teacher")
    meta = rollouts.metadata
    teacher_fp = model_fingerprint(cfg.teacher)
    relation = check_teacher_consistency(teacher_fp, meta.get("sft_teacher_fingerprint"),
                                         allow_mismatch=cfg.allow_teacher_mismatch, rollouts_dir=cfg.rollouts,
                                         teacher_dir=cfg.teacher, rollout_student=meta.get("student_fingerprint"),
                                         privileged_context=cfg.privileged_context)
    consistent = relation != "mismatch"
    if relation == "self_distillation":
        log.info("teacher-logprobs: self-distillation: the rollout student %s scores its own rollouts with the "
                 "prompts' privileged context (recorded in the shards)", teacher_fp)
    elif not consistent:
        log.warning("teacher-logprobs: TEACHER MISMATCH allowed by --allow-teacher-mismatch: SFT data teacher %s, "
                    "scoring teacher %s (recorded in the shards)", meta.get("sft_teacher_fingerprint"), teacher_fp)
    if tokenizer_fingerprint(cfg.teacher) != meta["tokenizer_fingerprint"]:  # the student's, recorded by rollouts
        check_tokenizers(cfg.teacher, meta["provenance"]["model_dir"])
    tokenizer = load_tokenizer(cfg.teacher)
    # top-k ids index the model's output rows, which may be more than the tokenizer's tokens (padding)
    vocab_size = model_vocab_size(cfg.teacher, len(tokenizer))
    params = codec_params(cfg.codec, cfg.codec_grid)
    metadata = {
        "role": "teacher_topk", **codec_info(cfg.codec, cfg.k, vocab_size, **params),
        "teacher_fingerprint": teacher_fp, "tokenizer_fingerprint": tokenizer_fingerprint(cfg.teacher),
        "student_fingerprint": meta.get("student_fingerprint"),
        "sft_teacher_fingerprint": meta.get("sft_teacher_fingerprint"),
        "teacher_mismatch_allowed": not consistent, "rollouts_fingerprint": shard_set_fingerprint(meta),
        "rollouts_sampling": meta.get("sampling"),
        "scoring_temperature": 1.0, "privileged_context": cfg.privileged_context,
        "max_seq_len": cfg.max_seq_len, "overlong": cfg.overlong, "engine_dtype": cfg.engine.dtype,
        # only when set, so the metadata (and resume identity) of every other shard set is what it was
        **({"max_response_tokens": cfg.max_response_tokens} if cfg.max_response_tokens is not None else {}),
        **({"self_distillation": True} if relation == "self_distillation" else {}),
        "provenance": {"teacher_dir": str(cfg.teacher.resolve()), "rollouts": str(cfg.rollouts.resolve())},
    }
    out = ShardSet.create(cfg.out, kind="teacher_topk", metadata=metadata)
    inputs = rollouts.complete_indices()
    todo = [i for i in inputs if cfg.mine(i) and not out.is_complete(i)]
    if not todo:
        log.info("teacher-logprobs: all %d shards complete in %s; nothing to do", len(inputs), cfg.out)
        out.finalize(expected_shards=len(inputs))
        return StageResult("teacher-logprobs", cfg.out, skipped=True, summary={"shards": len(inputs)})
    prefixes = None
    if cfg.privileged_context:
        if cfg.prompts is None:
            raise ValueError("teacher_logprobs.privileged_context needs teacher_logprobs.prompts (the prompts file)")
        use_tpl = meta.get("use_chat_template", True)
        prefixes = {p.id: encode_prompt(tokenizer, f"{p.privileged_context or ''}{p.prompt}", use_tpl)
                    for p in load_prompts(cfg.prompts)}
    encode = partial(encode_records, codec=cfg.codec, k=cfg.k, vocab_size=vocab_size, **params)
    # the engine stops its worker processes when the stage ends, also when it fails
    with make_engine(str(cfg.teacher), cfg.engine, max_logprobs=cfg.k) as engine:
        totals, seconds = _score_shards(engine, cfg, rollouts, out, todo, prefixes, encode, show_progress)
    out.finalize(expected_shards=len(inputs))
    log.info("teacher-logprobs: %d sequences, %d response tokens (%d truncated, %d skipped as overlong) in %.1fs",
             totals["sequences"], totals["tokens"], totals["truncated"], totals["skipped"], seconds)
    return StageResult("teacher-logprobs", cfg.out, wall_seconds=seconds,
                       summary={"shards": len(inputs), "shards_written": len(todo), **totals,
                                "teacher_consistent": consistent, "teacher_relation": relation})


def _score_shards(engine: Engine, cfg: TeacherLogprobsConfig, rollouts: ShardSet, out: ShardSet, todo: list[int],
                  prefixes: dict[str, list[int]] | None, encode: Callable[[list[TeacherRecord]], pa.Table],
                  show_progress: bool) -> tuple[dict[str, int], float]:
    """Score the ``todo`` shards into ``out``; (totals, seconds).

    A shard is scored in sub-batches of at most ``score_tokens_per_call(engine, k)`` tokens (the token budget,
    lowered at large k so a sub-batch's log-prob entries stay bounded). Each sub-batch is
    encoded and appended to its shard's file on the writer thread (WriteBehind streams it, in order) while
    the engine scores the next one; a shard's file is closed and renamed behind the scoring of the next
    shard. A worker holds the rollouts shard as Arrow, the sub-batch being scored, the one being encoded and
    written, and at most one row group of encoded rows: its memory does not grow with the shard.
    """
    totals = {"sequences": 0, "tokens": 0, "truncated": 0, "skipped": 0, "response_capped": 0}
    with timed() as t, progress_bar(not show_progress) as bar, WriteBehind(out) as writer:
        task = bar.add_task("teacher-logprobs", total=len(todo), rate="")
        for i in todo:
            table = rollouts.read_shard(i)
            lengths = pc.list_value_length(table["token_ids"]).to_pylist()
            # an empty shard still gets its (empty) table
            subs = token_batches(lengths, score_tokens_per_call(cfg.engine, cfg.k)) or [slice(0, 0)]
            for j, sub in enumerate(subs):
                rows = table.slice(sub.start, sub.stop - sub.start).to_pylist()  # Python objects per sub-batch only
                records, stats = score_table_rows(engine, rows, cfg.k, prefixes, cfg.max_seq_len, cfg.overlong,
                                                  cfg.max_response_tokens)
                writer.submit(i, partial(encode, records), last=j == len(subs) - 1)
                totals["sequences"] += len(records)
                totals["tokens"] += sum(len(r.teacher_logprobs) for r in records)
                totals["truncated"] += stats["truncated"]
                totals["skipped"] += stats["skipped"]
                totals["response_capped"] += stats["response_capped"]
            rate = totals["tokens"] / max(time.perf_counter() - t["start"], 1e-9)
            bar.update(task, advance=1, rate=f"{rate:,.0f} tok/s")
    return totals, t["seconds"]
