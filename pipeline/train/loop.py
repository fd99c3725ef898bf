"""The training loop."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import torch

from pipeline.config import OptimConfig, TrainConfig
from pipeline.train import checkpoint
from pipeline.train.batching import Example, pad_batch, split_by_token_budget
from pipeline.train.distributed import DistInfo, all_reduce_sum
from pipeline.train.head import Metrics, TokenStats, merge_chunk_metrics
from pipeline.train.losses import sft_cross_entropy
from pipeline.train.metrics import MetricsWriter, StepMeter, detect_peak_tflops
from pipeline.train.objective import local_step_sums, micro_batch_loss, step_norms
from pipeline.train.sources import BatchSource, step_micro_batches
from pipeline.train.student import StudentLM, autocast_context, count_flop_params, unwrap
from pipeline.train.weighting import RolloutTable


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant or cosine decay to 10% of the peak."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)

def sft_train(model: torch.nn.Module, examples: Iterator[Example], *, steps: int, batch_size: int,
              optim: OptimConfig, pad_id: int, metrics: MetricsWriter | None = None, log_every: int = 20,
              description: str = "sft", show_progress: bool = True,
              on_log: Callable[[int, dict], None] | None = None, ckpt_root: Path | None = None,
              checkpoint_every: int = 0, keep_checkpoints: int = 1, run_key: str = "",
              info: DistInfo | None = None, fsdp: bool = False, precision: str = "fp32",
              max_tokens_per_micro_batch: int | None = None, logits_chunk_tokens: int | None = None,
              peak_tflops: float | None = None, packing: bool = False) -> dict[str, float]:
    """Plain next-token SFT on response tokens; shared by `lopd sft`, the demo teacher bootstrap and the
    demo's SFT-continued control. ``model`` is a Hugging Face model (trained in place, one process) or the
    result of ``prepare_student`` (under torchrun).

    Data parallel under torchrun (``info``): every rank reads the same example stream, takes every
    world_size-th example of each global batch of ``batch_size``, splits its share into micro-batches of at
    most ``max_tokens_per_micro_batch`` padded tokens (real tokens with ``packing``: each micro-batch then runs
    as one padding-free row), and every micro-batch divides by the global response-token count, so any world
    size, budget and packing take the same optimiser steps.

    With ``ckpt_root`` it saves a sharded checkpoint (``pipeline.train.checkpoint``) every ``checkpoint_every`` steps
    and resumes from the latest, skipping the examples already consumed (``examples`` must be the same
    deterministic stream; the position is global, so another world size resumes too). ``run_key`` identifies
    the run; a checkpoint with another key is refused.
    """
    from pipeline.progress import log, progress_bar

    info = info or DistInfo()
    if not isinstance(model, (StudentLM, torch.nn.parallel.DistributedDataParallel)):
        model = StudentLM(model)
    device = next(model.parameters()).device
    model.train()
    opt = make_optimizer(model, optim)
    sched = make_scheduler(opt, optim, steps)
    fsdp_sharded = fsdp and info.world_size > 1
    meter = StepMeter(count_flop_params(unwrap(model)), info.world_size,
                      peak_tflops or detect_peak_tflops(device, precision))
    last: dict[str, float] = {}
    start_step = 0
    resumed = (checkpoint.load_latest(ckpt_root, model=model, optimizer=opt, scheduler=sched, run_key=run_key,
                                      rank=info.rank, what="SFT") if ckpt_root is not None else None)
    if resumed is not None:
        start_step = resumed.step
        meter.load_state_dict(resumed.trainer["meter"])
        if resumed.rank_state is not None:
            checkpoint.set_rng_state(resumed.rank_state["rng"])
        for _ in range(start_step * batch_size):  # the stream is deterministic: skip what was consumed
            next(examples)
        log.info("%s: resuming from %s at step %d", description, ckpt_root / f"step-{start_step:06d}", start_step)

    def loss_fn(normalizer: torch.Tensor) -> Callable[[TokenStats, int, int], tuple[torch.Tensor, Metrics]]:
        def chunk(stats: TokenStats, start: int, end: int) -> tuple[torch.Tensor, Metrics]:
            valid_1_n = torch.ones(1, end - start, dtype=torch.bool, device=stats.target_logprobs.device)
            return sft_cross_entropy(stats.target_logprobs[None], valid_1_n, normalizer=normalizer)
        return chunk

    with progress_bar(not (show_progress and info.is_main)) as bar:
        task = bar.add_task(description, total=steps, completed=start_step, rate="")
        for step in range(start_step + 1, steps + 1):
            t0 = time.perf_counter()
            batch = [next(examples) for _ in range(batch_size)][info.rank :: info.world_size]
            groups = split_by_token_budget([len(b[0]) for b in batch], max_tokens_per_micro_batch, packed=packing)
            micro = [pad_batch([batch[i][0] for i in g], [batch[i][1] for i in g], pad_id) for g in groups]
            meter.data_seconds += time.perf_counter() - t0
            counts = all_reduce_sum(torch.tensor([float(sum(int(m[2].sum()) for m in micro)),
                                                  float(sum(int(m[1].sum()) for m in micro))], dtype=torch.float64),
                                    info)
            normalizer = counts[0].clamp_min(1).float().to(device)
            opt.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), dtype=torch.float64)
            for input_ids_B_L, attention_B_L, mask_B_T in micro:
                input_ids_B_L, attention_B_L, mask_B_T = (input_ids_B_L.to(device), attention_B_L.to(device),
                                                          mask_B_T.to(device))
                meter.count_positions(attention_B_L, packing)
                with autocast_context(precision, device, fsdp_sharded):
                    loss, _ = model(input_ids_B_L, attention_B_L, mask_B_T.bool(), loss_fn(normalizer),
                                    chunk_tokens=logits_chunk_tokens, pack=packing)
                # DDP/FSDP average gradients over ranks; the loss is already divided by the global token count.
                (loss * info.world_size).backward()
                loss_sum += loss.detach().double().cpu()
            if optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            opt.step()
            sched.step()
            meter.tokens += int(counts[0])
            meter.model_tokens += int(counts[1])
            meter.seconds += time.perf_counter() - t0
            if step % log_every == 0 or step == steps:
                loss_value = float(all_reduce_sum(loss_sum, info))
                last = {"step": step, "loss/sft": loss_value, "optim/lr": sched.get_last_lr()[0],
                        "progress/tokens": meter.tokens, **meter.metrics(device)}
                if metrics and info.is_main:
                    metrics.write(last)
                if on_log:
                    on_log(step, last)
                bar.update(task, rate=f"loss {loss_value:.3f}")
            if ckpt_root is not None and checkpoint_every and step % checkpoint_every == 0 and step < steps:
                checkpoint.save(ckpt_root, step, model=model, optimizer=opt, scheduler=sched, run_key=run_key,
                                trainer={"meter": meter.state_dict()}, rank_state={"rng": checkpoint.rng_state()},
                                rank=info.rank, world_size=info.world_size, keep_last=keep_checkpoints)
            bar.update(task, advance=1)
    model.eval()
    return last

EvalHook = Callable[[torch.nn.Module], dict[str, float]]

def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, source: BatchSource,
               local: int, pad_id: int, info: DistInfo, device: torch.device, meter: StepMeter,
               rollouts: RolloutTable | None = None, reference: torch.nn.Module | None = None
               ) -> tuple[Metrics, float]:
    """One optimiser step: this rank's ``local`` records in micro-batches (by count, or by the token budget),
    each normalised by the step's global token / sequence counts (and routed counts, see ``StepNorms``),
    gradients accumulated, clipped, applied. ``rollouts``: the prompt statistics, when a method reads them;
    ``reference``: G-OPD's frozen reference model, when its top-k form is on."""
    t0 = time.perf_counter()
    micro_batches = step_micro_batches(source, cfg, local, pad_id, rollouts)  # the shard sources: prepared ahead
    meter.data_seconds += time.perf_counter() - t0
    local_counts = [sum(int(b.mask_B_T.sum()) for b in micro_batches),
                    sum(int(b.mask_B_T.any(-1).sum()) for b in micro_batches),
                    sum(int(b.attention_B_L.sum()) for b in micro_batches)]
    counts = all_reduce_sum(torch.tensor(local_counts + local_step_sums(cfg, micro_batches), dtype=torch.float64),
                            info)
    token_norm = counts[0].clamp_min(1).float().to(device)
    seq_norm = counts[1].clamp_min(1).float().to(device)
    norms = step_norms(cfg, token_norm, seq_norm, counts[3:].to(device))
    fsdp_sharded = cfg.fsdp and info.world_size > 1
    opt.zero_grad(set_to_none=True)
    parts: list[tuple[int, Metrics]] = []
    for mb in micro_batches:
        meter.count_positions(mb.attention_B_L, cfg.packing)
        mb = mb.to(device, non_blocking=True)  # asynchronous from pinned memory (prepare_step on CUDA)
        with autocast_context(cfg.precision, device, fsdp_sharded):
            loss, mb_metrics = micro_batch_loss(model, cfg, mb, norms.token, norms.seq, norms, reference)
        # DDP/FSDP average gradients over ranks; the loss is already divided by the global count.
        (loss * info.world_size).backward()
        parts.append((int(mb.mask_B_T.sum()), mb_metrics))
    merged = merge_chunk_metrics(parts)
    losses = [k for k in merged if k.startswith("loss/")]  # each rank holds its share of the step loss
    if losses and info.world_size > 1:
        summed = all_reduce_sum(torch.stack([merged[k].double().cpu() for k in losses]), info)
        merged.update(dict(zip(losses, summed)))
    grad_norm = (float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))
                 if cfg.optim.grad_clip else float("nan"))
    opt.step()
    meter.tokens += int(counts[0])
    meter.model_tokens += int(counts[2])
    meter.seconds += time.perf_counter() - t0
    return merged, grad_norm
