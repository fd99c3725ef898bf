"""Run under ``torchrun --standalone --nproc-per-node 2``: the FSDP2 student built by ``load_student`` +
``prepare_student`` (rank 0 reads the weights, rank 1 starts on the meta device), one optimiser step, one DCP
checkpoint. Writes, per rank, what the test checks to ``<out>/rank-<r>.json`` / ``.pt``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from pipeline.config import OptimConfig
from pipeline.train import checkpoint
from pipeline.train.distributed import leave_distributed, setup_distributed
from pipeline.train.loop import make_optimizer, make_scheduler
from pipeline.train.student import load_student, prepare_student


def main(model_dir: str, out: str) -> None:
    info = setup_distributed()
    out_dir = Path(out)
    lm = load_student(model_dir, info, fsdp=True)
    started_on_meta = all(p.is_meta for p in lm.parameters())
    loaded = list(lm.parameters())
    student = prepare_student(lm, info, fsdp=True)
    # what this rank holds on its device after start-up: its shards (DTensor local tensors) and the buffers
    local_bytes = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in student.parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in student.parameters())
    student_storages = {(p.to_local() if hasattr(p, "to_local") else p).untyped_storage().data_ptr()
                        for p in student.parameters()}
    # rank 0's loaded copy stays a plain CPU model: it is sent from, never sharded in place or moved to the device
    loaded_untouched = all(not p.is_meta and type(p) is torch.nn.Parameter and p.device.type == "cpu"
                           and p.untyped_storage().data_ptr() not in student_storages for p in loaded)
    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    buffers = {name: b.detach().cpu().clone() for name, b in student.named_buffers()}

    opt = make_optimizer(student, OptimConfig(lr=1e-2))
    sched = make_scheduler(opt, OptimConfig(lr=1e-2), 10)
    ids = torch.arange(2 * 12).reshape(2, 12) % lm.config.vocab_size
    select = torch.ones(2, 11, dtype=torch.bool)
    loss, _ = student(ids, torch.ones_like(ids), select,
                      lambda stats, start, end: (-stats.target_logprobs.sum() / 22, {}))
    loss.backward()
    opt.step()
    step_dir = checkpoint.save(out_dir / "ckpt", 1, model=student, optimizer=opt, scheduler=sched, run_key="k",
                               trainer={}, rank_state={}, rank=info.rank, world_size=info.world_size)
    local_optim_numel = sum(v.to_local().numel() if hasattr(v, "to_local") else v.numel()
                            for state in opt.state.values() for v in state.values() if torch.is_tensor(v) and v.dim())
    torch.save({"full": full, "buffers": buffers}, out_dir / f"rank-{info.rank}.pt")
    (out_dir / f"rank-{info.rank}.json").write_text(json.dumps({
        "started_on_meta": started_on_meta, "local_param_bytes": local_bytes, "full_param_bytes": full_bytes,
        "loaded_untouched": loaded_untouched, "loss": float(loss.detach()), "local_optim_numel": local_optim_numel,
        "full_optim_numel": 2 * sum(p.numel() for p in student.parameters()), "ckpt": str(step_dir)}))
    leave_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
