"""The one training loop of SFT and OPD. What differs between them is the objective (a micro-batch's loss and
the step's normalisers: ``objective.SftObjective`` / ``OpdObjective``) and the source of the micro-batches
(``sources.ExampleBatches`` / ``StepBatches``); the loop is the same:

    for each step:  micro-batches of this rank -> every rank agrees on their number -> global normalisers
                    -> forward/backward per micro-batch (gradients reduced once per step) -> clip -> step
                    -> log, evaluate, checkpoint

``start_run`` holds what comes before (process group, student prepared for scale, optimiser, schedule, resume from
the latest checkpoint). Under ``torchrun`` it is DDP or FSDP2 / HSDP; one process is the same code with world size 1.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch.distributed.fsdp import FSDPModule

from pipeline.config import OptimConfig, ScaleConfig
from pipeline.progress import log, progress_bar
from pipeline.train import checkpoint
from pipeline.train.batching import Batch, balance_micro_batches
from pipeline.train.distributed import DistInfo, all_reduce_max, all_reduce_sum, device_for
from pipeline.train.head import Metrics, merge_chunk_metrics
from pipeline.train.metrics import MetricsWriter, StepMeter, detect_peak_tflops
from pipeline.train.student import StudentLM, autocast_context, count_flop_params, unwrap
from storage.errors import LopdUserError

EvalHook = Callable[[torch.nn.Module], dict[str, float]]


class Objective(Protocol):
    """A micro-batch's loss and the step's normalisers (``objective.SftObjective``, ``objective.OpdObjective``)."""

    def at_step(self, step: int) -> "Objective":
        """The objective of (1-based) ``step`` (a loss schedule changes the terms by step)."""

    def local_sums(self, micro_batches: list[Batch]) -> list[float]:
        """This rank's sums behind the normalisers beyond the token and sequence counts (summed over ranks)."""

    def step_norms(self, token: torch.Tensor, seq: torch.Tensor, sums: torch.Tensor) -> Any:
        """The step's normalisers from the global token and sequence counts and the summed ``local_sums``."""

    def loss(self, model: torch.nn.Module, batch: Batch, norms: Any) -> tuple[torch.Tensor, Metrics]:
        """A micro-batch's share of the step loss (already divided by the global normalisers) and its metrics."""


class StepSource(Protocol):
    """Where a rank's micro-batches come from (``sources.ExampleBatches``, ``sources.StepBatches``)."""

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches of the next step."""

    def state_dict(self) -> dict[str, Any]:
        """The stream position, saved per rank in checkpoints."""

    def metrics(self, info: DistInfo) -> dict[str, float]:
        """The source's metrics at a log step (may be a collective: every rank calls it)."""

    def close(self) -> None:
        """Stop background work and free engines; the loop calls it when it ends, on error too."""


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant or cosine decay to 10% of the peak. ``factor(i)`` is the rate of the (i + 1)-th
    optimiser step: the first step uses 1 / warmup_steps of the peak, the last warm-up step the peak, and the
    run's last step (i = total_steps - 1) exactly the 10% floor."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - 1 - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def agree_on_micro_batches(micro_batches: list[Batch], info: DistInfo) -> tuple[list[Batch], int]:
    """This rank's micro-batches rebalanced to the most any rank formed this step (``balance_micro_batches``), and
    how many of them (the last ones) are idle. Ranks form different numbers under a token budget (their sequences
    differ in length) or at an epoch's short last batch; unequal numbers hang the step (FSDP2 all-gathers per
    forward, DDP reduces in the last backward)."""
    if info.world_size == 1:
        return micro_batches, 0
    target = int(all_reduce_max(torch.tensor([len(micro_batches)], dtype=torch.int64), info)[0])
    return balance_micro_batches(micro_batches, target)


def gradient_sync(model: torch.nn.Module, last: bool, fsdp_grad_sync: str) -> contextlib.AbstractContextManager:
    """Where a micro-batch's backward reduces gradients: DDP once per step (``no_sync`` on all but the last
    micro-batch: an all-reduce of the full gradient per micro-batch would be wasted); FSDP2 after every micro-batch
    (reduce-scatter: sharded gradients, the least memory), or with ``fsdp_grad_sync: step`` once per step."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if last else model.no_sync()
    if fsdp_grad_sync == "step" and isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last)  # recurses into the sharded layers
    return contextlib.nullcontext()


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, objective: Objective,
               micro_batches: list[Batch], cfg: ScaleConfig, grad_clip: float | None, info: DistInfo,
               device: torch.device, meter: StepMeter) -> tuple[Metrics, float]:
    """One optimiser step on this rank's ``micro_batches``: the ranks agree on their number, each micro-batch's
    loss is divided by the step's global normalisers (so any world size and micro-batching take the same step,
    except for the methods that select or bound tokens per micro-batch: TIP, BAPO, Clip-Cov / KL-Cov, see
    docs/methods.md), gradients are accumulated (reduced once per step under DDP), clipped and applied. A micro-batch
    without target tokens (an empty response, an idle copy) runs like any other with zero contribution. A gradient
    norm that is not finite (inf / NaN in some loss or gradient) skips the update on every rank alike (the norm is a
    global reduction): weights and optimiser state stay as they were. Returns the step's metrics (``loss/*`` summed
    over ranks; ``micro/*``: the micro-batches per rank, how many the ranks added to agree and how many are idle;
    ``optim/skipped``: 1 when the update was skipped) and the gradient norm before clipping."""
    formed = len(micro_batches)
    micro_batches, idle = agree_on_micro_batches(micro_batches, info)
    real = micro_batches[:len(micro_batches) - idle]
    local_counts = [sum(int(b.mask_B_T.sum()) for b in real), sum(int(b.mask_B_T.any(-1).sum()) for b in real),
                    sum(int(b.attention_B_L.sum()) for b in real), len(micro_batches) - formed, idle]
    counts = all_reduce_sum(torch.tensor(local_counts + objective.local_sums(real), dtype=torch.float64), info)
    norms = objective.step_norms(counts[0].clamp_min(1).float().to(device), counts[1].clamp_min(1).float().to(device),
                                 counts[5:].to(device))
    fsdp_sharded = cfg.fsdp and info.launched
    opt.zero_grad(set_to_none=True)
    parts: list[tuple[int, Metrics]] = []
    for i, mb in enumerate(micro_batches):
        tokens = int(mb.mask_B_T.sum())  # on the host copy: no device sync (0 for an idle copy)
        if i < len(real):
            meter.count_positions(mb.attention_B_L, cfg.packing)
        mb = mb.to(device, non_blocking=True)  # asynchronous from pinned memory (prepare_step on CUDA)
        with gradient_sync(model, i == len(micro_batches) - 1, cfg.fsdp_grad_sync), \
                autocast_context(cfg.precision, device, fsdp_sharded):
            loss, mb_metrics = objective.loss(model, mb, norms)
            # DDP/FSDP average gradients over ranks; the loss is already divided by the global count. An idle
            # micro-batch has no target token: a zero loss and gradient, through the same collectives.
            (loss * info.world_size).backward()
        parts.append((tokens, mb_metrics))  # without tokens: its keys (the ranks reduce the same), no statistic
    merged = {**merge_chunk_metrics(parts), "micro/per_rank": torch.tensor(float(len(micro_batches))),
              "micro/added": counts[3].float(), "micro/idle": counts[4].float()}
    losses = [k for k in merged if k.startswith("loss/")]  # each rank holds its share of the step loss
    if losses and info.world_size > 1:
        summed = all_reduce_sum(torch.stack([merged[k].double().cpu() for k in losses]), info)
        merged.update(dict(zip(losses, summed)))
    # the global norm (DDP's gradients are already reduced; FSDP2's norm reduces over the shards); without a clip
    # it is still measured, to catch a non-finite gradient before it reaches the weights and the optimiser state
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf")))
    skipped = not math.isfinite(grad_norm)
    if skipped:
        opt.zero_grad(set_to_none=True)
    else:
        opt.step()
    merged["optim/skipped"] = torch.tensor(float(skipped))
    meter.skipped_steps += int(skipped)
    meter.tokens += int(counts[0])
    meter.model_tokens += int(counts[2])
    return merged, grad_norm


@dataclass
class Run:
    """What the loop trains and where it starts: the prepared student, its optimiser and schedule, the meter, and,
    when resumed, the checkpoint's step and this rank's saved state (RNG, source position)."""

    info: DistInfo
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    meter: StepMeter
    start_step: int = 0
    resumed_world_size: int | None = None
    rank_state: dict[str, Any] | None = None


@dataclass(frozen=True)
class CheckpointPlan:
    """Where and how often the loop saves a resumable checkpoint (``pipeline.train.checkpoint``). ``at_end``: also
    at the last step (OPD; SFT's final model dir is its durable result)."""

    root: Path
    every: int
    keep: int | None
    run_key: str
    at_end: bool = True

    def due(self, step: int, steps: int) -> bool:
        return (step % self.every == 0 and step < steps) or (step == steps and self.at_end)


def start_run(model: torch.nn.Module, info: DistInfo, cfg: ScaleConfig, optim: OptimConfig, steps: int,
              ckpt: CheckpointPlan | None = None, what: str = "training") -> Run:
    """Optimiser, schedule and meter for the prepared ``model`` (``student.prepare_student``), resumed from the
    latest checkpoint under ``ckpt`` if there is one (its run key must match; its RNG state is restored)."""
    device = device_for(info)
    opt = make_optimizer(model, optim)
    sched = make_scheduler(opt, optim, steps)
    meter = StepMeter(count_flop_params(unwrap(model)), info.world_size,
                      cfg.peak_tflops or detect_peak_tflops(device, cfg.precision),
                      head_params=unwrap(model).get_output_embeddings().weight.numel())
    run = Run(info, device, model, opt, sched, meter)
    resumed = (checkpoint.load_latest(ckpt.root, model=model, optimizer=opt, scheduler=sched, run_key=ckpt.run_key,
                                      rank=info.rank, what=what) if ckpt is not None else None)
    if resumed is not None:
        run.start_step, run.resumed_world_size, run.rank_state = resumed.step, resumed.world_size, resumed.rank_state
        meter.load_state_dict(resumed.trainer["meter"])
        if resumed.rank_state is not None:
            checkpoint.set_rng_state(resumed.rank_state["rng"])
        log.info("%s: resuming from %s at step %d", what, ckpt.root / f"step-{run.start_step:06d}", run.start_step)
    return run


def check_launch(cfg: ScaleConfig, info: DistInfo, *, field: str, online: bool = False,
                 eval_hook: bool = False) -> None:
    """Refuse, before any work, the combinations that would hang or silently run slow on this launch."""
    if cfg.fsdp and info.launched and (online or eval_hook):
        what = "online OPD samples with HF generate" if online else "the evaluation hook runs on rank 0 only"
        raise LopdUserError(f"{field}.fsdp=true on {info.world_size} ranks: {what}, outside the sharded forward, so "
                            "the layers' all-gathers would hang; set "
                            f"{field}.fsdp=false (DDP) or run it in one process")
    if (cfg.packing and torch.cuda.is_available()
            and cfg.attn_implementation not in ("flash_attention_2", "flex_attention")):
        raise LopdUserError(f"{field}.packing=true on CUDA with attn_implementation={cfg.attn_implementation!r}: "
                            "sdpa and eager build a dense S x S block mask from the restarting position ids, "
                            f"slower than padding; set {field}.attn_implementation to flash_attention_2 (pip install "
                            "flash-attn) or flex_attention, or set packing=false")


def run_loop(run: Run, objective: Objective, source: StepSource, cfg: ScaleConfig, *, steps: int,
             grad_clip: float | None, log_every: int, metrics: MetricsWriter | None = None,
             ckpt: CheckpointPlan | None = None, description: str = "train", show_progress: bool = True,
             eval_hook: EvalHook | None = None, eval_every: int | None = None,
             on_log: Callable[[int, dict], None] | None = None, stop_after: int | None = None,
             loss_key: str = "loss/total") -> tuple[dict[str, Any], int]:
    """Steps ``run.start_step + 1 .. steps`` of ``objective`` on ``source``: log every ``log_every`` steps (and the
    last), evaluate with ``eval_hook`` every ``eval_every`` steps (main rank; its time is not training time), save a
    checkpoint every ``ckpt.every`` steps. ``stop_after`` ends the work early (tests simulate a kill with it).
    Closes ``source`` when it ends, on error too. Returns the last logged metrics and the last step run."""
    info, device, model, meter = run.info, run.device, run.model, run.meter
    model.train()
    last: dict[str, Any] = {}
    step = run.start_step
    if eval_hook and eval_every and run.start_step == 0 and info.is_main and metrics is not None:
        metrics.write({"step": 0, "perf/train_seconds": 0.0, **eval_hook(unwrap(model))})
        model.train()
    consecutive_skips = 0
    with contextlib.closing(source), progress_bar(not (show_progress and info.is_main)) as bar:
        task = bar.add_task(description, total=steps, completed=run.start_step, rate="")
        for step in range(run.start_step + 1, steps + 1):
            t0 = time.perf_counter()
            micro_batches = source.next_step()  # the shard sources prepared it ahead: the wait is on their queue
            meter.data_seconds += time.perf_counter() - t0
            lr = run.optimizer.param_groups[0]["lr"]  # the rate this step's update uses (logged below)
            parts, grad_norm = train_step(model, run.optimizer, objective.at_step(step), micro_batches, cfg,
                                          grad_clip, info, device, meter)
            consecutive_skips = consecutive_skips + 1 if parts["optim/skipped"] else 0
            if consecutive_skips:
                log.warning("%s step %d: gradient norm %s, update skipped on every rank (%d in a row)", description,
                            step, grad_norm, consecutive_skips)
            if consecutive_skips >= cfg.max_nonfinite_steps:
                raise LopdUserError(
                    f"{description}: {consecutive_skips} steps in a row (to step {step}) had a non-finite gradient "
                    "norm (inf / NaN) and were skipped; the weights and optimiser state are those of the last good "
                    "step (its checkpoint resumes). Lower the learning rate, check the data of these steps (a "
                    "teacher log-prob of -inf, an overlong row), or run with precision fp32; max_nonfinite_steps "
                    "sets how many skips in a row are tolerated")
            run.scheduler.step()
            meter.seconds += time.perf_counter() - t0
            if step % log_every == 0 or step == steps:
                last = {"step": step, **{k: round(float(v), 6) for k, v in parts.items()},
                        "optim/lr": lr, "optim/grad_norm": grad_norm, "optim/skipped_steps": meter.skipped_steps,
                        "progress/tokens": meter.tokens, "progress/model_tokens": meter.model_tokens,
                        "perf/train_seconds": round(meter.seconds, 3),
                        **meter.metrics(device), **source.metrics(info)}
                if eval_hook and eval_every and step % eval_every == 0 and info.is_main:
                    last.update(eval_hook(unwrap(model)))
                    model.train()
                if metrics is not None:
                    metrics.write(last)
                if on_log:
                    on_log(step, last)
                bar.update(task, rate=f"loss {last.get(loss_key, float('nan')):.4f}")
            bar.update(task, advance=1)
            if ckpt is not None and ckpt.due(step, steps):
                checkpoint.save(ckpt.root, step, model=model, optimizer=run.optimizer, scheduler=run.scheduler,
                                run_key=ckpt.run_key, trainer={"meter": meter.state_dict()},
                                rank_state={"rng": checkpoint.rng_state(), "source": source.state_dict()},
                                rank=info.rank, world_size=info.world_size, keep_last=ckpt.keep)
            if stop_after is not None and step >= stop_after:
                break
    model.eval()
    return last, step


def train_in_process(lm: torch.nn.Module, source: StepSource, objective: Objective, cfg: ScaleConfig,
                     optim: OptimConfig, *, steps: int, **loop: Any) -> dict[str, Any]:
    """A single-process run of an in-memory Hugging Face model ``lm`` (trained in place; no checkpoints): the demo's
    teacher bootstrap and SFT controls. The same loop as the stages."""
    info = DistInfo()
    run = start_run(StudentLM(lm), info, cfg, optim, steps)
    last, _ = run_loop(run, objective, source, cfg, steps=steps, grad_clip=optim.grad_clip, **loop)
    return last
