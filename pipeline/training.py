"""Training plumbing shared by SFT and OPD: distributed set-up, the student model prepared for scale (chunked
LM head, bf16 mixed precision, activation checkpointing, DDP / FSDP2 / HSDP), token-budget micro-batches,
throughput and memory metrics, plots, and the plain SFT loop. Loss math lives in ``pipeline.losses``; the
checkpoint format in ``pipeline.checkpoint``."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from pipeline import checkpoint
from pipeline.config import OptimConfig
from pipeline.head import HeadPrepass, Metrics, TokenStats, chunked_token_stats, fused_head_loss
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


def setup_distributed(timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment; world size 1 otherwise.
    ``timeout_minutes`` bounds every collective (raise it when a checkpoint save or the first step is slow)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():  # TF32 for the fp32 matmuls that remain (master weights, optimiser)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world == 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)  # before the group: NCCL's communicators then bind to this rank's GPU
    if not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(torch.cuda.is_available()),
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def process_group_backend(cuda: bool) -> str:
    """gloo on CPU; with GPUs NCCL for CUDA tensors and gloo for CPU ones. The trainer all-reduces small CPU
    tensors (the step's token counts, method sums, logged losses); a group with NCCL alone refuses them ("no
    backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def leave_distributed() -> None:
    """Destroy the process group ``setup_distributed`` joined, if any, before the process exits (its gloo/NCCL
    threads otherwise meet interpreter shutdown and can abort a finished run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def pack_padded(input_ids_B_L: torch.Tensor, attention_B_L: torch.Tensor, select_B_T: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A right-padded micro-batch as one padding-free row: ``input_ids_1_S`` (S = real tokens), ``position_ids_1_S``
    restarting at 0 for each sequence, and ``select_1_T`` (T = S - 1) marking the same targets in the same
    row-major order as ``select_B_T``. transformers reads restarting position ids (with no attention mask) as
    document boundaries: block-diagonal causal attention (varlen flash-attention 2 or flex attention on GPU, a
    dense block mask under sdpa/eager). A sequence's last position (it would predict the next sequence's first
    token) is never a target: ``pad_batch`` only selects t < length - 1."""
    keep_B_L = attention_B_L.bool()
    input_ids_1_S = input_ids_B_L[keep_B_L][None]
    position_ids_1_S = (keep_B_L.cumsum(-1) - 1)[keep_B_L][None]
    select_B_L = torch.nn.functional.pad(select_B_T, (0, 1), value=False)
    select_1_T = select_B_L[keep_B_L][None, :-1]
    return input_ids_1_S, position_ids_1_S, select_1_T


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


class StudentLM(torch.nn.Module):
    """A causal LM whose forward returns a loss through the chunked LM head: the decoder's final hidden states
    at the selected target positions go to ``fused_head_loss``, so no B x T x V logits exist.

    DDP and FSDP2 wrap this module (its forward is the one their hooks see, so the head weight is gathered
    and its gradient reduced like any other). ``self.lm`` is the Hugging Face model, saved as is.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids_B_L: torch.Tensor, attention_B_L: torch.Tensor, select_B_T: torch.Tensor,
                loss_fn: Callable[[TokenStats, int, int], tuple[torch.Tensor, Metrics]] | None, *,
                topk_ids_N_K: torch.Tensor | None = None, chunk_tokens: int | None = None,
                entropy: bool = False, argmax: bool = False, pack: bool = False,
                prepass: HeadPrepass | None = None) -> tuple[torch.Tensor, Metrics]:
        """``select_B_T`` marks the targets (shifted positions) the loss reads; ``loss_fn`` sees them flattened
        in row-major order, chunk by chunk (see ``pipeline.head.fused_head_loss``). ``pack``: run the decoder on
        the right-padded batch packed into one padding-free row (``pack_padded``); same targets, same order.
        ``prepass``: a no-grad pass over all selected tokens before the loss (``pipeline.head.HeadPrepass``).
        ``loss_fn`` None: no loss; returns the selected tokens' ``TokenStats`` (``chunked_token_stats``, no
        gradient) and no metrics, the forward of a frozen model (G-OPD's reference) through the same wrappers."""
        position_ids_B_L = None
        if pack:
            input_ids_B_L, position_ids_B_L, select_B_T = pack_padded(input_ids_B_L, attention_B_L, select_B_T)
            attention_B_L = None
        hidden_B_L_H = self.lm.get_decoder()(input_ids=input_ids_B_L, attention_mask=attention_B_L,
                                             position_ids=position_ids_B_L, use_cache=False).last_hidden_state
        hidden_N_H = hidden_B_L_H[:, :-1][select_B_T]
        targets_N = input_ids_B_L[:, 1:][select_B_T]
        head = self.lm.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise NotImplementedError("an LM head with a bias is not supported by the chunked head")
        if loss_fn is None:
            return chunked_token_stats(hidden_N_H, head.weight, targets_N, topk_ids_N_K=topk_ids_N_K,
                                       chunk_tokens=chunk_tokens), {}
        return fused_head_loss(hidden_N_H, head.weight, targets_N, loss_fn, topk_ids_N_K=topk_ids_N_K,
                               chunk_tokens=chunk_tokens, entropy=entropy, argmax=argmax, prepass=prepass)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DDP wrapper and/or a ``StudentLM``."""
    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return model.lm if isinstance(model, StudentLM) else model


def count_flop_params(lm: torch.nn.Module) -> int:
    """Parameters that cost 6 FLOPs per token in training (the input embedding lookup costs none)."""
    total = sum(p.numel() for p in lm.parameters())
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = head is not None and embed.weight.data_ptr() == head.weight.data_ptr()
    return total if tied else total - embed.weight.numel()


def load_student(path: str | Path, info: DistInfo, *, fsdp: bool,
                 attn_implementation: str | None = None) -> torch.nn.Module:
    """The student's Hugging Face model, for ``prepare_student``. Under FSDP2 on several ranks only rank 0 reads
    the weights (on CPU); the other ranks build the model on the meta device and receive their shards from rank 0
    in ``prepare_student``, so no rank but 0 ever holds the full model (DDP keeps a full replica per rank)."""
    from pipeline.models import load_model, model_skeleton

    if fsdp and info.world_size > 1 and info.rank != 0:
        return model_skeleton(path, attn_implementation)
    return load_model(path, attn_implementation=attn_implementation)


def prepare_reference(path: str | Path, info: DistInfo, *, fsdp: bool, precision: str = "fp32",
                      attn_implementation: str | None = None) -> torch.nn.Module:
    """A frozen model for no-grad forwards beside the student (G-OPD's reference policy): ``StudentLM`` with
    ``requires_grad`` off, in eval mode; under FSDP2 on several ranks sharded like the student (rank 0 reads the
    weights), otherwise a plain replica on this rank's device (nothing to reduce: no DDP), in bf16 when the run
    is. Its forward with ``loss_fn=None`` returns per-token ``TokenStats``."""
    lm = load_student(path, info, fsdp=fsdp, attn_implementation=attn_implementation)
    lm.requires_grad_(False)
    if fsdp and info.world_size > 1:
        reference = prepare_student(lm, info, fsdp=True, precision=precision)
    else:
        if precision == "bf16":
            lm = lm.to(torch.bfloat16)
        reference = StudentLM(lm).to(device_for(info))
    lm.config.use_cache = False
    return reference.eval()


def prepare_student(lm: torch.nn.Module, info: DistInfo, *, fsdp: bool, precision: str = "fp32",
                    activation_checkpointing: bool = False, fsdp_shard_size: int | None = None) -> torch.nn.Module:
    """The trainable student: ``StudentLM(lm)`` on this rank's device, with activation checkpointing per decoder
    layer (non-reentrant) when asked, wrapped for data parallelism under torchrun:

    - FSDP2: ``fully_shard`` per decoder layer, then the root; with ``precision="bf16"`` a
      ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: fp32 master weights and optimiser state,
      bf16 compute, fp32 gradient reduction. ``fsdp_shard_size`` < world size shards within groups of that
      many ranks and replicates across groups (HSDP, a 2-D device mesh).
    - DDP otherwise; bf16 then runs under ``autocast`` (see ``autocast_context``), weights stay fp32.

    Under FSDP2, ``lm`` is the full model on rank 0 and a meta-device skeleton elsewhere (``load_student``): the
    skeleton is sharded, its local shards allocated, and every rank's shards (and buffers) filled from rank 0.
    """
    lm.config.use_cache = False
    if activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    device = device_for(info)
    on_meta = any(p.is_meta for p in lm.parameters())
    if on_meta and not (fsdp and info.world_size > 1):
        raise ValueError("a meta-device student can only be prepared for FSDP2 on several ranks")
    student = StudentLM(lm) if on_meta else StudentLM(lm).to(device)
    if info.world_size == 1:
        return student
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        full_state = student.state_dict() if info.rank == 0 else {}  # references, taken before sharding

        kwargs: dict[str, Any] = {}
        if precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if fsdp_shard_size and fsdp_shard_size < info.world_size:
            from torch.distributed.device_mesh import init_device_mesh

            if info.world_size % fsdp_shard_size:
                raise ValueError(f"train.fsdp_shard_size={fsdp_shard_size} must divide the world size "
                                 f"{info.world_size}")
            kwargs["mesh"] = init_device_mesh(device.type,
                                              (info.world_size // fsdp_shard_size, fsdp_shard_size),
                                              mesh_dim_names=("replicate", "shard"))
        for layer in getattr(getattr(lm, "model", lm), "layers", []):
            fully_shard(layer, **kwargs)
        fully_shard(student, **kwargs)
        if on_meta:
            student.to_empty(device=device)  # this rank's shards only
        set_model_state_dict(student, full_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in student.buffers():  # not in the state dict (e.g. rotary inv_freq), not sharded
            dist.broadcast(buffer, src=0)
        return student
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(student)


def autocast_context(precision: str, device: torch.device, fsdp_sharded: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for a single process or DDP; FSDP2 casts through its mixed-precision policy instead."""
    if precision == "bf16" and not fsdp_sharded:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def split_by_token_budget(lengths: list[int], budget: int | None, parts: int = 1,
                          packed: bool = False) -> list[list[int]]:
    """Indices of the sequences grouped into micro-batches.

    Without a ``budget``: ``parts`` equal consecutive groups (gradient accumulation by count). With one:
    sequences sorted longest first, grouped greedily so that a micro-batch's size stays within ``budget``
    tokens: its padded size (its longest sequence x its count), or with ``packed`` its real tokens (the sum of
    its lengths); a sequence longer than the budget goes alone. The step's loss does not depend on the
    grouping: every micro-batch divides by the step's global counts.
    """
    n = len(lengths)
    if budget is None:
        size = n // parts
        return [list(range(i * size, (i + 1) * size)) for i in range(parts)]
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    if packed:  # first fit: each sequence joins the first micro-batch it fits in
        used: list[int] = []
        for i in order:
            j = next((j for j, u in enumerate(used) if u + lengths[i] <= budget), len(groups))
            if j == len(groups):
                groups.append([])
                used.append(0)
            groups[j].append(i)
            used[j] += lengths[i]
        return groups
    for i in order:
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(i)  # sorted longest first: the group's first member is its longest
        else:
            groups.append([i])
    return groups


# Dense bf16 peak FLOP/s per device, for the MFU estimate (fp32 runs use TF32 peaks at half of these).
_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                     "B200": 2250.0, "GB200": 2500.0}


def detect_peak_tflops(device: torch.device, precision: str) -> float | None:
    """Peak dense TFLOP/s of this rank's GPU (None on CPU or an unknown GPU: give ``peak_tflops``)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops if precision == "bf16" else tflops / 2
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


@dataclass
class StepMeter:
    """Throughput counters of a run: model tokens (attended, for FLOPs), padded positions, time computing and
    time waiting for data. ``metrics`` turns them into the perf/* keys people watch at scale."""

    flop_params: int
    world_size: int
    peak_tflops: float | None = None
    tokens: int = 0  # global response tokens trained on (the loss's tokens)
    model_tokens: int = 0  # global attended tokens through the model (prompt + response)
    padded: int = 0  # this rank's padded positions
    slots: int = 0  # this rank's B x L positions
    seconds: float = 0.0  # wall time of steps, data wait included
    data_seconds: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("tokens", "model_tokens", "padded", "slots", "seconds", "data_seconds")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def count_positions(self, attention_B_L: torch.Tensor, packed: bool) -> None:
        """Count a micro-batch's positions: B x L with padding, only the real tokens when packed."""
        real = int(attention_B_L.sum())
        self.slots += real if packed else attention_B_L.numel()
        self.padded += 0 if packed else attention_B_L.numel() - real

    def metrics(self, device: torch.device) -> dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        out = {"perf/tokens_per_s": round(self.tokens / seconds, 1),
               "perf/model_tokens_per_s": round(self.model_tokens / seconds, 1),
               "perf/padding_frac": round(self.padded / max(self.slots, 1), 4),
               "perf/data_wait_frac": round(self.data_seconds / seconds, 4),
               "perf/peak_mem_gb": round(peak_memory_gb(device), 3)}
        if self.peak_tflops:
            flops = 6.0 * self.flop_params * self.model_tokens
            out["perf/mfu"] = round(flops / seconds / (self.peak_tflops * 1e12 * self.world_size), 4)
        return out


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
    """Every rank calls it (gathering the full state is a collective under FSDP: the one full gather of a run);
    the main rank writes the trained weights as an HF model dir with ``base_dir``'s config, atomically."""
    from pipeline.models import load_model

    if fsdp and info.world_size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        sd = {k.removeprefix("lm."): v for k, v in sd.items()}
    else:
        sd = unwrap(model).state_dict()
    if info.is_main:
        final = load_model(base_dir)
        final.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in sd.items()})
        save_hf_model(final, tokenizer, out, provenance)


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

    With ``ckpt_root`` it saves a sharded checkpoint (``pipeline.checkpoint``) every ``checkpoint_every`` steps
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
