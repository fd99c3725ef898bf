"""scripts/gpu-check.sh on tiny shapes on CPU (--cpu-smoke): the script that records the GPU figures keeps
working between the sessions that have a GPU (lopd train under torchrun with FSDP2, a token budget and a resume;
training steps, micro-batch memory, the head's weight gradient, vLLM scoring)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def test_gpu_check_cpu_smoke(tmp_path):
    res = subprocess.run(["bash", "scripts/gpu-check.sh", "--cpu-smoke", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"), "TMPDIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "gpu-check.json").read_text())
    assert {(r["T"], r["loss"]) for r in data["train"]} == {(128, "lightning"), (128, "reverse_kl_topk"),
                                                            (256, "lightning"), (256, "reverse_kl_topk")}
    assert all(r["tokens_per_s"] > 0 and r["step_seconds"] > 0 for r in data["train"])
    assert len(data["micro_batch_8b"]) == 4 and all(r["loss_value"] > 0 for r in data["micro_batch_8b"])
    assert data["vllm"] and all(r["tokens_per_s"] > 0 for r in data["vllm"])
    run = data["torchrun_train"]  # the users' path: torchrun, FSDP2, token budget, a DCP checkpoint resumed
    assert run["nproc"] == 2 and run["final_model"] and [r["step"] for r in run["steps"]] == [1, 2, 3, 4]
    assert all(r["loss/total"] > 0 and r["perf/tokens_per_s"] > 0 for r in run["steps"])
    assert sum(r["micro/added"] for r in run["steps"]) > 0  # the ranks' micro-batch counts differed and agreed
    assert data["head_weight_grad"]["two_step"]["seconds"] > 0 and data["head_weight_grad"]["fused"] is None


def test_train_memory_bench_on_a_tiny_shape():
    """`lopd bench train-memory` end to end on a tiny shape (the full-size run is in docs/benchmarks.md): every
    path runs in its own process, the chunked head matches the full-logit loss and gradients, and activation
    checkpointing changes no gradient."""
    from pipeline.bench.scale import bench_train_memory

    out = bench_train_memory(lengths=(128, 256), losses=("reverse_kl_topk",), shape="tiny", vocab=512,
                             max_full_tokens=256, chunk_tokens=48)
    assert out["chunk_tokens"] == 48 and len(out["cases"]) == 2
    for case in out["cases"]:
        assert case["loss_rel_diff"] < 1e-5 and case["grad_rel_diff"] < 1e-5, case
        assert case["ckpt_grads_equal_chunked"], case
        assert case["peak_bytes_full"] > 0 and case["ratio"] > 0 and case["tokens_per_s_chunked"] > 0
    assert set(out["chunked_ckpt_peak_growth_longest_vs_shortest"]) == {"reverse_kl_topk"}
