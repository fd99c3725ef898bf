"""pipeline/train/distributed.py: the process group's backends."""

from __future__ import annotations


def test_the_gpu_process_group_serves_the_trainers_cpu_collectives():
    """The trainer all-reduces small CPU tensors (token counts, method sums, logged losses) beside the CUDA
    gradients. A group made with "nccl" alone maps only cuda to a backend, so those calls would fail on the first
    multi-GPU step; lopd's GPU group maps cpu to gloo and cuda to nccl (parsed here by torch itself)."""
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from pipeline.train.distributed import process_group_backend

    assert BackendConfig(Backend("nccl")).get_device_backend_map() == {"cuda": "nccl"}  # why the mapping is needed
    assert BackendConfig(process_group_backend(cuda=True)).get_device_backend_map() == {"cpu": "gloo",
                                                                                         "cuda": "nccl"}
    assert process_group_backend(cuda=False) == "gloo"
