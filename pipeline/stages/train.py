"""Stage 4: the offline OPD trainer (Lightning OPD). Streams batches from the teacher top-k shards and never
loads a teacher. ``online=...`` turns it into the standard online OPD baseline (the student samples and a
live teacher scores every step, same losses) for comparison.

Resumable: every ``checkpoint_every`` steps it saves model, optimiser, scheduler, RNG and the reader's
position; a rerun continues from the latest checkpoint and, on CPU in deterministic mode, reproduces the
uninterrupted loss curve exactly. Runs under ``torchrun`` (DDP, or FSDP2 with ``fsdp: true``); a single
process is the same code with world size 1.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pipeline import losses as L
from pipeline.config import OnlineConfig, TrainConfig
from pipeline.fingerprint import model_fingerprint, read_provenance
from pipeline.models import encode_prompt, load_model, load_tokenizer
from pipeline.stages.common import StageResult, log, progress_bar
from pipeline.training import (DistInfo, MetricsWriter, all_reduce_sum, device_for, full_state_dict,
                               load_latest_checkpoint, load_model_state, load_optimizer_state, make_optimizer,
                               make_scheduler, optimizer_state, pad_batch, plot_metrics, rng_state, save_checkpoint,
                               save_trained_model, seed_everything, set_rng_state, setup_distributed, unwrap, wrap_model)
from storage.reader import ReaderState, iter_batches
from storage.records import TeacherRecord
from storage.shardset import ShardSet

TOPK_LOSSES = {"reverse_kl_topk", "forward_kl_topk", "jsd_topk", "tvd_topk"}


@dataclass
class Batch:
    """Tensors for one micro-batch; the ``_B_T`` tensors are aligned with the shifted targets."""

    input_ids_B_L: torch.Tensor
    attention_B_L: torch.Tensor
    mask_B_T: torch.Tensor
    teacher_logprobs_B_T: torch.Tensor
    behavior_logprobs_B_T: torch.Tensor
    topk_ids_B_T_K: torch.Tensor
    topk_logprobs_B_T_K: torch.Tensor
    tail_logprob_B_T: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def collate(records: list[TeacherRecord], pad_id: int) -> Batch:
    """Right-pad token ids; scatter each record's per-response-position arrays to target positions
    ``prompt_len-1 .. len-2`` of the shifted sequence (exactly where ``mask_B_T`` is true, row by row)."""
    input_ids_B_L, attention_B_L, mask_B_T = pad_batch([r.token_ids for r in records],
                                                       [r.prompt_len for r in records], pad_id)
    B, T = mask_B_T.shape
    K = records[0].topk_ids.shape[1]
    where = mask_B_T.numpy()

    def scatter(parts: list[np.ndarray], fill: float, dtype: type, tail: tuple[int, ...] = ()) -> torch.Tensor:
        out = np.full((B, T, *tail), fill, dtype=dtype)
        out[where] = np.concatenate(parts).astype(dtype, copy=False)
        return torch.from_numpy(out)

    return Batch(
        input_ids_B_L, attention_B_L, mask_B_T,
        scatter([r.teacher_logprobs for r in records], 0.0, np.float32),
        scatter([r.behavior_logprobs for r in records], 0.0, np.float32),
        scatter([r.topk_ids for r in records], 0, np.int64, (K,)),
        scatter([r.topk_logprobs for r in records], -1e4, np.float32, (K,)),
        scatter([r.tail_logprob for r in records], -1e4, np.float32),
    )


def compute_losses(cfg: TrainConfig, logits_B_T_V: torch.Tensor, batch: Batch, token_normalizer: torch.Tensor,
                   seq_normalizer: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the configured loss terms; each term normalised by the global counts."""
    terms: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
    targets_B_T = batch.input_ids_B_L[:, 1:]
    for name, weight in cfg.losses.items():
        if weight == 0:
            continue
        if name in TOPK_LOSSES:
            extra = {"beta": cfg.jsd_beta} if name == "jsd_topk" else {}
            terms[name] = getattr(L, name)(logits_B_T_V, batch.topk_ids_B_T_K, batch.topk_logprobs_B_T_K,
                                           batch.tail_logprob_B_T, batch.mask_B_T, tail_bucket=cfg.tail_bucket,
                                           normalizer=token_normalizer, **extra)
        elif name == "lightning":
            lc = cfg.lightning
            student_lp_B_T = L.gather_logprobs(logits_B_T_V, targets_B_T)
            terms[name] = L.lightning_pg(
                student_lp_B_T, batch.teacher_logprobs_B_T, batch.behavior_logprobs_B_T, batch.mask_B_T,
                importance=lc.importance, is_cap=lc.is_cap, clip_eps_low=lc.clip_eps_low,
                clip_eps_high=lc.clip_eps_high, advantage_clip=lc.advantage_clip, normalization=lc.normalization,
                normalizer=seq_normalizer if lc.normalization == "sequence" else token_normalizer)
        elif name == "sft":
            terms[name] = L.sft_cross_entropy(logits_B_T_V, targets_B_T, batch.mask_B_T, normalizer=token_normalizer)
    return L.combined_loss(terms, {name: cfg.losses[name] for name in terms})


def config_hash(cfg: TrainConfig) -> str:
    """What must not change across a resume (paths to outputs and step counts may)."""
    keep = cfg.model_dump(mode="json", exclude={"out", "steps", "checkpoint_every", "keep_checkpoints", "log_every"})
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


class OnlineBatches:
    """The online OPD baseline's data: each call samples fresh rollouts from the current student and has a
    live teacher score them (same record type as the shards, so the same losses apply)."""

    def __init__(self, online: OnlineConfig, student: torch.nn.Module, student_dir: Path, k: int, seed: int,
                 rank: int = 0):
        from pipeline.config import EngineConfig
        from pipeline.engines.hf import HFEngine
        from pipeline.prompts import load_prompts

        self.cfg = online
        self.tokenizer = load_tokenizer(student_dir)
        self.student_engine = HFEngine(str(student_dir), EngineConfig(batch_size=512), model=student)
        self.teacher_engine = HFEngine(str(online.teacher), EngineConfig(batch_size=512))
        self.prompts = load_prompts(online.prompts)
        self.prompt_ids = [encode_prompt(self.tokenizer, p.prompt, online.use_chat_template) for p in self.prompts]
        self.k = k
        self.rng = random.Random(seed + 1_000_003 * rank)  # each data-parallel rank draws its own prompts
        self.sample_seed = online.sampling.seed + 1_000_003 * rank
        self.calls = 0
        self.sample_seconds = 0.0
        self.score_seconds = 0.0

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler is: a resumed run draws the prompts and samples the uninterrupted run would."""
        return {"rng": self.rng.getstate(), "calls": self.calls,
                "sample_seconds": self.sample_seconds, "score_seconds": self.score_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.calls = state["calls"]
        self.sample_seconds, self.score_seconds = state["sample_seconds"], state["score_seconds"]

    def next(self, n_sequences: int) -> list[TeacherRecord]:
        n_prompts = max(1, n_sequences // self.cfg.sampling.n)
        chosen = [self.rng.randrange(len(self.prompts)) for _ in range(n_prompts)]
        was_training = self.student_engine.model.training
        self.student_engine.model.eval()
        t0 = time.perf_counter()
        gens = self.student_engine.generate([self.prompt_ids[i] for i in chosen],
                                            self.cfg.sampling.model_copy(update={"seed": self.sample_seed + self.calls}))
        t1 = time.perf_counter()
        self.student_engine.model.train(was_training)
        seqs, starts, meta = [], [], []
        for i, samples in zip(chosen, gens):
            for j, g in enumerate(samples):
                seqs.append(self.prompt_ids[i] + g.response_ids)
                starts.append(len(self.prompt_ids[i]))
                meta.append((i, j, g))
        scored = self.teacher_engine.score(seqs, starts, self.k)
        self.sample_seconds += t1 - t0
        self.score_seconds += time.perf_counter() - t1
        self.calls += 1
        return [TeacherRecord(prompt_id=self.prompts[i].id, sample_index=j,
                              token_ids=np.asarray(seq, dtype=np.int32), prompt_len=start,
                              teacher_logprobs=sc.token_logprobs,
                              behavior_logprobs=np.asarray(g.logprobs, dtype=np.float32),
                              topk_ids=sc.topk_ids, topk_logprobs=sc.topk_logprobs, tail_logprob=sc.tail_logprob,
                              reward=None)
                for (i, j, g), seq, start, sc in zip(meta, seqs, starts, scored)][:n_sequences]


EvalHook = Callable[[torch.nn.Module], dict[str, float]]


def run_train(cfg: TrainConfig, show_progress: bool = True, eval_hook: EvalHook | None = None,
              eval_every: int | None = None, stop_after: int | None = None) -> StageResult:
    """Train ``cfg.steps`` optimiser steps (resuming from ``cfg.out/ckpt`` if present).

    ``eval_hook`` (the demo's accuracy probe) runs every ``eval_every`` steps; its time is excluded from
    ``perf/train_seconds``. ``stop_after`` ends the process's work early (tests use it to simulate a kill).
    """
    info = setup_distributed()
    device = device_for(info)
    out = Path(cfg.out)
    ckpt_root = out / "ckpt"
    final_dir = out / "final"
    chash = config_hash(cfg)
    if (final_dir / "lopd_provenance.json").exists():
        done = read_provenance(final_dir)
        if done.get("train_config_hash") == chash and done.get("steps") == cfg.steps:
            log.info("train: %s is complete (same config, %d steps); nothing to do", final_dir, cfg.steps)
            return StageResult("train", out, skipped=True, summary={"final_model": str(final_dir)})

    micro = cfg.batch_size // (cfg.grad_accum * info.world_size)
    if micro < 1 or micro * cfg.grad_accum * info.world_size != cfg.batch_size:
        raise ValueError(f"train.batch_size={cfg.batch_size} must be a multiple of grad_accum × world size "
                         f"= {cfg.grad_accum} × {info.world_size}")
    seed_everything(cfg.seed, cfg.deterministic)
    tokenizer = load_tokenizer(cfg.student)
    model = load_model(cfg.student).to(device)
    model.train()

    shard_meta: dict[str, Any] = {}
    if cfg.online is None:
        shards = ShardSet.open(cfg.shards)
        shard_meta = shards.metadata
        needed_topk = set(cfg.losses) & TOPK_LOSSES
        if shards.kind != "teacher_topk":
            raise ValueError(f"{cfg.shards}: not teacher top-k shards (kind {shards.kind}); run `lopd teacher-logprobs`")
        student_fp = model_fingerprint(cfg.student)
        if shard_meta.get("student_fingerprint") not in (None, student_fp):
            log.warning("train: shards were sampled from student %s but training starts from %s; the rollouts are "
                        "then off-policy for this student", shard_meta.get("student_fingerprint"), student_fp)
        if needed_topk and not shard_meta.get("k"):
            raise ValueError(f"{cfg.shards}: losses {sorted(needed_topk)} need top-k shards")

    model = wrap_model(model, info, cfg.fsdp)
    opt = make_optimizer(model, cfg.optim)
    sched = make_scheduler(opt, cfg.optim, cfg.steps)

    start_step, reader_state = 0, None
    state = load_latest_checkpoint(ckpt_root)
    if state is not None:
        if state["config_hash"] != chash:
            raise ValueError(f"{ckpt_root}: checkpoint was written with a different training config "
                             f"({state['config_hash']} vs {chash}); use a new train.out or delete {ckpt_root}")
        load_model_state(model, state["model"], cfg.fsdp)
        load_optimizer_state(model, opt, state["optimizer"], cfg.fsdp)
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        saved_world = len(state.get("reader") or state.get("online") or [None])
        if saved_world != info.world_size:
            # each rank's stream position is saved; another world size would see other sequences
            raise ValueError(f"{ckpt_root}: checkpoint was written by {saved_world} process(es), this run has "
                             f"{info.world_size}; resume with --nproc-per-node {saved_world} or use a new train.out")
        reader_state = ReaderState.from_dict(state["reader"][info.rank]) if state.get("reader") else None
        log.info("train: resuming from %s at step %d", ckpt_root / f"step-{start_step:06d}", start_step)

    if cfg.online is None:
        stream: Iterator[tuple[list[TeacherRecord], Any]] = iter_batches(
            cfg.shards, micro, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, rank=info.rank,
            world_size=info.world_size, start=reader_state)
        online = None
    else:
        online = OnlineBatches(cfg.online, unwrap(model), cfg.student, cfg.online.k, cfg.seed, rank=info.rank)
        if state is not None and state.get("online"):
            online.load_state_dict(state["online"][info.rank])
        stream = None  # type: ignore[assignment]

    metrics = MetricsWriter(out / "metrics.jsonl", enabled=info.is_main, resume_step=start_step)
    train_seconds = float(state.get("train_seconds", 0.0)) if state else 0.0
    tokens_total = int(state.get("tokens", 0)) if state else 0
    pad_id = tokenizer.pad_token_id
    last: dict[str, Any] = {}
    if eval_hook and start_step == 0 and eval_every and info.is_main:
        metrics.write({"step": 0, "perf/train_seconds": 0.0, **eval_hook(unwrap(model))})
    with progress_bar(not (show_progress and info.is_main)) as bar:
        task = bar.add_task("train (online OPD)" if online else "train (offline OPD)", total=cfg.steps,
                            completed=start_step, rate="")
        for step in range(start_step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            if online is None:
                micro_batches = []
                for _ in range(cfg.grad_accum):
                    records, reader_state = next(stream)
                    micro_batches.append(collate(records, pad_id))
            else:
                micro_batches = [collate(online.next(micro), pad_id) for _ in range(cfg.grad_accum)]
            local_tokens = sum(int(b.mask_B_T.sum()) for b in micro_batches)
            local_seqs = sum(int(b.mask_B_T.any(-1).sum()) for b in micro_batches)
            counts = all_reduce_sum(torch.tensor([local_tokens, local_seqs], dtype=torch.float64), info)
            token_norm = counts[0].clamp_min(1).float().to(device)
            seq_norm = counts[1].clamp_min(1).float().to(device)
            opt.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for mb in micro_batches:
                mb = mb.to(device)
                logits_B_T_V = model(input_ids=mb.input_ids_B_L, attention_mask=mb.attention_B_L).logits[:, :-1].float()
                loss, parts = compute_losses(cfg, logits_B_T_V, mb, token_norm, seq_norm)
                # DDP/FSDP average gradients over ranks; the loss is already divided by the global count.
                (loss * info.world_size).backward()
                for key, v in parts.items():
                    sums[key] = sums.get(key, 0.0) + float(v)
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                         if cfg.optim.grad_clip else torch.tensor(float("nan")))
            opt.step()
            sched.step()
            train_seconds += time.perf_counter() - t0
            tokens_total += int(counts[0])
            if step % cfg.log_every == 0 or step == cfg.steps:
                last = {"step": step, **{k: round(v, 6) for k, v in _finalise(sums, micro_batches).items()},
                        "optim/lr": sched.get_last_lr()[0], "optim/grad_norm": float(grad_norm),
                        "progress/tokens": tokens_total, "perf/train_seconds": round(train_seconds, 3),
                        "perf/tokens_per_s": round(tokens_total / max(train_seconds, 1e-9), 1)}
                if online is not None:
                    last.update({"perf/sample_seconds": round(online.sample_seconds, 3),
                                 "perf/score_seconds": round(online.score_seconds, 3)})
                if eval_hook and eval_every and step % eval_every == 0 and info.is_main:
                    last.update(eval_hook(unwrap(model)))
                    model.train()
                metrics.write(last)
                bar.update(task, rate=f"loss {last.get('loss/total', float('nan')):.4f}")
            bar.update(task, advance=1)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _checkpoint(ckpt_root, step, model, opt, sched, reader_state, info, cfg, chash, train_seconds,
                            tokens_total, online.state_dict() if online is not None else None)
            if stop_after is not None and step >= stop_after:
                return StageResult("train", out, summary={"stopped_at": step})

    provenance = {**read_provenance(cfg.student), "stage": "train", "train_config_hash": chash, "steps": cfg.steps,
                  "opd_teacher_fingerprint": shard_meta.get("teacher_fingerprint"),
                  "teacher_mismatch_allowed": shard_meta.get("teacher_mismatch_allowed"),
                  "online": cfg.online is not None}
    save_trained_model(model, cfg.fsdp, info, cfg.student, tokenizer, final_dir, provenance)
    if info.is_main:
        plot_metrics(out / "metrics.jsonl", out / "curves.png",
                     title="online OPD" if cfg.online else "offline OPD (Lightning)")
    if info.world_size > 1:
        torch.distributed.barrier()
    log.info("train: %d steps, %.1fs of training, %d tokens -> %s", cfg.steps, train_seconds, tokens_total, final_dir)
    return StageResult("train", out, wall_seconds=train_seconds,
                       summary={"final_model": str(final_dir), "train_seconds": train_seconds, "last": last})


def _finalise(sums: dict[str, float], micro_batches: list[Batch]) -> dict[str, float]:
    """Loss terms are already globally normalised (sum over micro-batches); ratio/mean metrics are averaged."""
    n = len(micro_batches)
    return {k: (v if k.startswith("loss/") else v / n) for k, v in sums.items()}


def _checkpoint(root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
                reader_state: Any, info: DistInfo, cfg: TrainConfig, chash: str, train_seconds: float,
                tokens: int, online_state: dict[str, Any] | None = None) -> None:
    import torch.distributed as dist

    readers = [reader_state.to_dict() if reader_state is not None else None]
    onlines = [online_state]
    if info.world_size > 1:  # every rank's stream position, so each resumes its own
        gathered: list[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, (readers[0], online_state))
        readers, onlines = [g[0] for g in gathered], [g[1] for g in gathered]
    sd = full_state_dict(model, cfg.fsdp)
    opt_sd = optimizer_state(model, opt, cfg.fsdp)
    if info.is_main:
        save_checkpoint(root, step, {
            "step": step, "model": sd, "optimizer": opt_sd, "scheduler": sched.state_dict(),
            "rng": rng_state(), "reader": readers if readers[0] is not None else None,
            "config_hash": chash, "train_seconds": train_seconds, "tokens": tokens,
            "online": onlines if online_state is not None else None,
        }, keep_last=cfg.keep_checkpoints)
    if info.world_size > 1:
        dist.barrier()
