"""The student as the trainer holds it: ``StudentLM`` (decoder -> chunked LM head), loading, preparation for
scale (bf16, activation checkpointing, DDP / FSDP2 / HSDP), G-OPD's frozen reference, and saving."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from pipeline.fingerprint import write_provenance
from pipeline.models import load_model, model_skeleton
from pipeline.train.batching import pack_padded
from pipeline.train.distributed import DistInfo, device_for
from pipeline.train.head import HeadPrepass, Metrics, TokenStats, chunked_token_stats, fused_head_loss


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
        in row-major order, chunk by chunk (see ``pipeline.train.head.fused_head_loss``). ``pack``: run the decoder on
        the right-padded batch packed into one padding-free row (``pack_padded``); same targets, same order.
        ``prepass``: a no-grad pass over all selected tokens before the loss (``pipeline.train.head.HeadPrepass``).
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
    """Parameters that cost 6 FLOPs per token in training (the input embedding lookup costs none). Tying is read
    from the config, not from storage: under FSDP2 a DTensor's ``data_ptr()`` is 0, which would read every model
    as tied (and count an untied Qwen3-8B's 0.6B embedding parameters as compute)."""
    total = sum(p.numel() for p in lm.parameters())
    if lm.config.tie_word_embeddings:
        return total
    return total - lm.get_input_embeddings().weight.numel()


def load_student(path: str | Path, info: DistInfo, *, fsdp: bool,
                 attn_implementation: str | None = None) -> torch.nn.Module:
    """The student's Hugging Face model, for ``prepare_student``. Under FSDP2 on several ranks only rank 0 reads
    the weights (on CPU); the other ranks build the model on the meta device and receive their shards from rank 0
    in ``prepare_student``, so no rank but 0 ever holds the full model (DDP keeps a full replica per rank)."""
    if fsdp and info.launched and info.rank != 0:
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
    if fsdp and info.launched:
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

    Under FSDP2, ``lm`` is the full model on rank 0 (on the CPU) and a meta-device skeleton elsewhere
    (``load_student``). Every rank, rank 0 included, shards a meta skeleton and allocates only its local shards on
    its device; rank 0 then sends each rank its shards (and the buffers) from its CPU copy
    (``set_model_state_dict(..., broadcast_from_rank0=True)``), so no device ever holds more than its shards: the
    full fp32 model on GPU 0 runs out of memory from about 14B.
    """
    device = device_for(info)
    on_meta = any(p.is_meta for p in lm.parameters())
    if on_meta and not (fsdp and info.launched):
        raise ValueError("a meta-device student can only be prepared for FSDP2 under torchrun")
    full_state: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    if fsdp and info.launched and not on_meta:  # rank 0: the weights stay on the CPU
        full_state = {f"lm.{k}": v for k, v in lm.state_dict().items()}
        buffers = {f"lm.{k}": v for k, v in lm.named_buffers()}
        with torch.device("meta"):
            lm = type(lm)(lm.config)
        on_meta = True
    lm.config.use_cache = False
    if activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student = StudentLM(lm) if on_meta else StudentLM(lm).to(device)
    if not info.launched:
        return student
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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
        student.to_empty(device=device)  # this rank's shards only
        set_model_state_dict(student, full_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for name, buffer in student.named_buffers():  # not in the state dict (e.g. rotary inv_freq), not sharded
            if info.rank == 0:
                buffer.copy_(buffers[name])
            dist.broadcast(buffer, src=0)
        return student
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(student)


def autocast_context(precision: str, device: torch.device, fsdp_sharded: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for a single process or DDP; FSDP2 casts through its mixed-precision policy instead."""
    if precision == "bf16" and not fsdp_sharded:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def save_hf_model(model: torch.nn.Module, tokenizer: Any, out: Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write an HF model directory atomically (temp dir, then rename); the provenance file goes in too."""
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
                       out: Path, provenance: dict[str, Any], precision: str = "fp32") -> None:
    """Every rank calls it (gathering the full state is a collective under FSDP: the one full gather of a run);
    the main rank writes the trained weights as an HF model dir with ``base_dir``'s config, atomically: a meta
    skeleton of ``base_dir`` takes the gathered tensors as they are (no second full model is loaded), in bf16 when
    the run trained in bf16 (16 GB at 8B instead of 32 GB), else in fp32."""
    if fsdp and info.launched:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        sd = {k.removeprefix("lm."): v for k, v in sd.items()}
    else:
        sd = unwrap(model).state_dict()
    if info.is_main:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        final = model_skeleton(base_dir)
        final.load_state_dict({k: v.to("cpu", dtype) if v.is_floating_point() else v.cpu() for k, v in sd.items()},
                              assign=True)
        final.tie_weights()
        save_hf_model(final, tokenizer, out, provenance)
