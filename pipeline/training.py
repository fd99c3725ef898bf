"""Training plumbing shared by SFT and OPD: distributed set-up, optimiser and schedule, batching,
checkpoints, metrics, plots, and the plain SFT loop. Loss math lives in ``pipeline.losses``."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import OptimConfig
from pipeline.losses import sft_cross_entropy

Example = tuple[np.ndarray, int]  # (token_ids, prompt_len)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment; world size 1 otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def device_for(info: DistInfo) -> torch.device:
    return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


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


def pad_batch(sequences: list[list[int]] | list[np.ndarray], prompt_lens: list[int], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to ``input_ids_B_L`` and ``attention_B_L``; ``response_mask_B_L`` marks the *targets*
    (position t of the shifted targets is a response token)."""
    lengths_B = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    plens_B = np.asarray(prompt_lens, dtype=np.int64)
    width = int(lengths_B.max())
    cols_L = np.arange(width)
    attention_B_L = cols_L[None, :] < lengths_B[:, None]
    input_ids_B_L = np.full((len(sequences), width), pad_id, dtype=np.int64)
    input_ids_B_L[attention_B_L] = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
    # target t (predicting token t+1) is a response token for plen-1 <= t < n-1
    response_mask_B_L = (cols_L[None, :-1] >= plens_B[:, None] - 1) & (cols_L[None, :-1] < lengths_B[:, None] - 1)
    return (torch.from_numpy(input_ids_B_L), torch.from_numpy(attention_B_L.astype(np.int64)),
            torch.from_numpy(response_mask_B_L))


class MetricsWriter:
    """Appends one JSON object per step to ``metrics.jsonl`` (main rank only). On resume it truncates
    lines past the checkpoint step, so the file always tells one consistent history."""

    def __init__(self, path: Path, enabled: bool = True, resume_step: int = 0):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resume_step]
                self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: Path, out_png: Path, keys: list[str] | None = None, title: str = "") -> Path | None:
    """One PNG with a panel per metric (loss parts, KL estimate, accuracy...) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        return None
    keys = keys or [k for k in rows[-1] if k.startswith(("loss/", "lightning/", "is/", "eval/", "kl/"))]
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def wrap_model(model: torch.nn.Module, info: DistInfo, fsdp: bool) -> torch.nn.Module:
    """DDP, or FSDP2 (``fully_shard`` per decoder layer, then the root) under torchrun; as is for one process."""
    if info.world_size == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(getattr(model, "model", model), "layers", []):
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def full_state_dict(model: torch.nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The whole model's state on CPU (a collective under FSDP: every rank must call it)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def load_model_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(model).load_state_dict(sd)


def optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, fsdp: bool) -> dict[str, Any]:
    """The optimiser state as one full (unsharded) dict, so any world size can resume from it."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any], fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def save_hf_model(model: torch.nn.Module, tokenizer: Any, out: Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write an HF model directory atomically (temp dir, then rename); the provenance file goes in too."""
    from pipeline.fingerprint import write_provenance

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if provenance is not None:
        write_provenance(tmp, provenance)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def save_trained_model(model: torch.nn.Module, fsdp: bool, info: DistInfo, base_dir: Path, tokenizer: Any,
                       out: Path, provenance: dict[str, Any]) -> None:
    """Every rank calls it (gathering the full state is a collective under FSDP); the main rank writes the
    trained weights as an HF model dir with ``base_dir``'s config, atomically, with ``provenance``."""
    from pipeline.models import load_model

    sd = full_state_dict(model, fsdp)
    if info.is_main:
        final = load_model(base_dir)
        final.load_state_dict(sd)
        save_hf_model(final, tokenizer, out, provenance)


def save_checkpoint(ckpt_root: Path, step: int, state: dict[str, Any], keep_last: int | None = None) -> Path:
    """``ckpt_root/step-000050/state.pt`` written to a temp name then renamed; ``latest`` points at it.
    ``keep_last``: then delete all but the newest ``keep_last`` checkpoints (None keeps every one)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    latest_tmp = ckpt_root / "latest.tmp"
    latest_tmp.write_text(final.name)
    latest_tmp.replace(ckpt_root / "latest")
    if keep_last is not None:
        for old in sorted(ckpt_root.glob("step-*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint_step(ckpt_root: Path) -> int:
    """Step of the latest checkpoint under ``ckpt_root`` (0 if none), without loading it."""
    pointer = Path(ckpt_root) / "latest"
    return int(pointer.read_text().strip().removeprefix("step-")) if pointer.exists() else 0


def load_latest_checkpoint(ckpt_root: Path) -> dict[str, Any] | None:
    pointer = ckpt_root / "latest"
    if not pointer.exists():
        return None
    return torch.load(ckpt_root / pointer.read_text().strip() / "state.pt", weights_only=False)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def sft_train(model: torch.nn.Module, examples: Iterator[Example], *, steps: int, batch_size: int,
              optim: OptimConfig, pad_id: int, metrics: MetricsWriter | None = None, log_every: int = 20,
              description: str = "sft", show_progress: bool = True,
              on_log: Callable[[int, dict], None] | None = None, ckpt_root: Path | None = None,
              checkpoint_every: int = 0, keep_checkpoints: int = 1, run_key: str = "",
              info: DistInfo | None = None, fsdp: bool = False) -> dict[str, float]:
    """Plain next-token SFT on response tokens; shared by `lopd sft`, the demo teacher bootstrap and the
    demo's SFT-continued control.

    Data parallel under torchrun (``info``; ``model`` already wrapped by ``wrap_model``): every rank reads the
    same example stream, takes every world_size-th example of each global batch of ``batch_size``, and the loss
    is normalised by the global response-token count, so any world size takes the same optimiser steps.

    With ``ckpt_root`` it saves model, optimiser, scheduler and RNG every ``checkpoint_every`` steps and resumes
    from the latest checkpoint, skipping the examples already consumed (``examples`` must be the same
    deterministic stream). ``run_key`` identifies the run; a checkpoint with another key is refused.
    """
    from pipeline.stages.common import log, progress_bar

    info = info or DistInfo()
    device = next(model.parameters()).device
    model.train()
    opt = make_optimizer(model, optim)
    sched = make_scheduler(opt, optim, steps)
    last: dict[str, float] = {}
    start_step, tokens, seconds = 0, 0, 0.0
    state = load_latest_checkpoint(ckpt_root) if ckpt_root is not None else None
    if state is not None:
        if state["run_key"] != run_key:
            raise ValueError(f"{ckpt_root}: checkpoint was written by a different SFT run (other data, model or "
                             f"config: {state['run_key']} vs {run_key}); delete {ckpt_root} to start over")
        load_model_state(model, state["model"], fsdp)
        load_optimizer_state(model, opt, state["optimizer"], fsdp)
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step, tokens, seconds = state["step"], state["tokens"], state["seconds"]
        for _ in range(start_step * batch_size):  # the stream is deterministic: skip what was consumed
            next(examples)
        log.info("%s: resuming from %s at step %d", description, ckpt_root / f"step-{start_step:06d}", start_step)

    start = time.perf_counter() - seconds
    with progress_bar(not (show_progress and info.is_main)) as bar:
        task = bar.add_task(description, total=steps, completed=start_step, rate="")
        for step in range(start_step + 1, steps + 1):
            batch = [next(examples) for _ in range(batch_size)][info.rank :: info.world_size]
            input_ids_B_L, attention_B_L, mask_B_T = pad_batch([b[0] for b in batch], [b[1] for b in batch], pad_id)
            input_ids_B_L, attention_B_L, mask_B_T = input_ids_B_L.to(device), attention_B_L.to(device), mask_B_T.to(device)
            step_tokens = all_reduce_sum(mask_B_T.sum().to(torch.float64), info)
            logits_B_T_V = model(input_ids=input_ids_B_L, attention_mask=attention_B_L).logits[:, :-1].float()
            loss, parts = sft_cross_entropy(logits_B_T_V, input_ids_B_L[:, 1:], mask_B_T,
                                            normalizer=step_tokens.clamp_min(1).float())
            opt.zero_grad(set_to_none=True)
            # DDP/FSDP average gradients over ranks; the loss is already divided by the global token count.
            (loss * info.world_size).backward()
            if optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            opt.step()
            sched.step()
            tokens += int(step_tokens)
            if step % log_every == 0 or step == steps:
                elapsed = time.perf_counter() - start
                loss_value = float(all_reduce_sum(loss.detach().to(torch.float64), info))
                last = {"step": step, "loss/sft": loss_value, "optim/lr": sched.get_last_lr()[0],
                        "progress/tokens": tokens, "perf/tokens_per_s": tokens / max(elapsed, 1e-9)}
                if metrics and info.is_main:
                    metrics.write(last)
                if on_log:
                    on_log(step, last)
                bar.update(task, rate=f"loss {loss_value:.3f}")
            if ckpt_root is not None and checkpoint_every and step % checkpoint_every == 0 and step < steps:
                model_sd, opt_sd = full_state_dict(model, fsdp), optimizer_state(model, opt, fsdp)
                if info.is_main:
                    save_checkpoint(ckpt_root, step, {
                        "run_key": run_key, "step": step, "tokens": tokens, "seconds": time.perf_counter() - start,
                        "model": model_sd, "optimizer": opt_sd, "scheduler": sched.state_dict(),
                        "rng": rng_state()}, keep_last=keep_checkpoints)
                if info.world_size > 1:
                    dist.barrier()
            bar.update(task, advance=1)
    model.eval()
    return last
