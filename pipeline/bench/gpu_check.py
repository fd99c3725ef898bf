"""The GPU check (``scripts/gpu-check.sh --part P``): lopd's scale figures on one lent GPU, in parts that each fit one
short command. Every part writes ``<out>/gpu-check-<part>.json`` after each case, so a part stopped at its time limit
still returns what it measured; each case first checks the time left (``--deadline-s``) and the free disk it needs.
Models are random-init Qwen3 shapes built in their compute dtype directly on the GPU.

Parts, and their expected time on one H100 (989 TFLOP/s dense bf16, 3.35 TB/s HBM; assumed 35% MFU = 350 TFLOP/s
for training, 50% for vLLM prefill; disk ~1 GB/s; each process start with torch + CUDA ~20 s):

``train`` (expected ~3.5 min, disk <= 17 GB):
  - ``torchrun_train``, the users' path: ``lopd train`` under ``torchrun --nproc-per-node 1``, FSDP2, bf16,
    activation checkpointing, 32 ragged rows of 1,024-4,096 tokens, a 16,384-token budget, a 0.6B-shaped student
    (hidden 1024, 28 layers, vocab 151,936). Launch 1 runs steps 1-2 and writes one DCP checkpoint (fp32 weights +
    Adam state: 0.6B x 12 B = 7.2 GB, ~8 s); launch 2 resumes from it and runs step 3 (its end-of-run checkpoint
    replaces the first: keep_checkpoints 1, <= 2 on disk while it writes). Compute: 3 steps x 8 rows x ~2,560 tokens
    = 61k tokens x 6 x 0.6e9 x 4/3 (recompute) = 3e14 FLOP, ~1 s. Time is start-up: 2 launches x ~40 s + 2 x 8 s
    of checkpoint I/O + the student's bf16 save (1.2 GB) ~= 100 s.
  - ``train``: 1.7B-shaped student (hidden 2048, 28 layers), fp32 master weights on the GPU, bf16 compute,
    3 optimiser steps of 4 sequences at T = 4,096 and 8,192 for ``lightning`` and ``reverse_kl_topk``. Per token
    6 x 1.72e9 x 4/3 = 1.4e10 FLOP plus attention 4 x 28 x T x 2048 x 4/3 (1.3e9 at 4k, 2.6e9 at 8k): a 16k-token
    step 2.5e14 FLOP ~0.7 s, a 32k-token step 5.4e14 ~1.5 s; 12 steps + first-step warm-up ~= 30 s, 4 model
    builds ~10 s. Memory: 1.7B x 16 B = 27 GB + activations.

``head`` (expected ~1 min, no disk):
  - ``micro_batch_8b``: an 8B-shaped student (hidden 4096, 36 layers) in bf16 (what an FSDP2 rank computes with
    after its all-gather: 16 GB weights + 16 GB gradients), one forward+backward of 4 sequences at T = 4,096 and
    8,192, both losses: 6 x 8.2e9 x 4/3 x 32k tokens = 2.1e15 FLOP ~6 s at 8k, ~3 s at 4k; 4 cases ~20 s + build.
  - ``head_weight_grad``: 2,048 tokens in 220-token chunks into a 151,936 x 4,096 fp32 gradient: the two-step form
    moves ~12 GB per chunk (10 chunks: ~40 ms), the fused addmm ~3.7 GB; 3 repeats each, well under a second.

``score`` (expected ~4 min, disk 16.4 GB; needs vLLM, so not on a bare image):
  - the 8B-shaped teacher built in bf16 on the GPU and saved (16.4 GB, ~20 s), then in its own process one vLLM
    engine (budget 16,384 tokens per step; load ~20 s, compile + CUDA graphs ~60-90 s) scoring 32 x 6,144 tokens
    at k = 20 and k = 128: 2 x 8.2e9 x 197k = 3.2e15 FLOP per pass ~7 s at 50% MFU, plus the log-softmax and top-k
    over 197k x 151,936 logits (~120 GB of fp32 traffic, ~40 ms per GB-pass: a few seconds). Device memory from
    ``torch.cuda.mem_get_info`` deltas (the engine runs the model in another process).

``parity`` (expected ~2.5 min; needs vLLM): ``pipeline.bench.parity`` on a tiny model, VLLMEngine against
HFEngine in float32, once per model runner (``VLLM_USE_V2_MODEL_RUNNER`` 0 and 1 on a GPU; vLLM's default
elsewhere): each run is one process start (~20 s) and one engine start (~40 s, eager).

``--cpu-smoke`` runs every part on tiny shapes on CPU (CI does), the torchrun part on 2 gloo ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.bench.scale import QWEN3_VOCAB, bench_head_weight_grad, qwen3_model, ragged_records, synthetic_records

PARTS = ("train", "head", "score", "parity")
GB = 1e9


@dataclass(frozen=True)
class Shapes:
    """What each part runs, at the GPU's scale or (``cpu_smoke``) on tiny shapes."""

    device: str
    vocab: int
    torchrun: dict[str, Any]
    train_shape: str
    train_lengths: tuple[int, ...]
    train_steps: int
    train_batch: int
    precision: str
    big_shape: str
    big_lengths: tuple[int, ...]
    head: dict[str, Any]
    score: dict[str, Any]

    @staticmethod
    def for_mode(cpu_smoke: bool) -> Shapes:
        if cpu_smoke:
            return Shapes(device="cpu", vocab=1024,
                          torchrun=dict(shape="tiny", nproc=2, min_len=20, max_len=128, rows=16, batch=8, budget=150,
                                        precision="fp32"),
                          train_shape="tiny", train_lengths=(128, 256), train_steps=2, train_batch=2, precision="fp32",
                          big_shape="tiny", big_lengths=(128, 256),
                          head=dict(vocab=1024, hidden=64, tokens=256, chunk_tokens=64),
                          score=dict(shape="tiny", T=128, n=4, ks=(4,), budget=256))
        return Shapes(device="cuda", vocab=QWEN3_VOCAB,
                      torchrun=dict(shape="qwen3-0.6b", nproc=1, min_len=1024, max_len=4096, rows=32, batch=8,
                                    budget=16384, precision="bf16"),
                      train_shape="qwen3-1.7b", train_lengths=(4096, 8192), train_steps=3, train_batch=4,
                      precision="bf16", big_shape="qwen3-8b", big_lengths=(4096, 8192),
                      head=dict(vocab=QWEN3_VOCAB, hidden=4096, tokens=2048),
                      score=dict(shape="qwen3-8b", T=6144, n=32, ks=(20, 128), budget=16384))


def param_count(shape: str, vocab: int) -> int:
    """Parameters of a Qwen3 shape (from the meta device: no memory)."""
    return sum(p.numel() for p in qwen3_model(shape, vocab, device="meta").parameters())


class Report:
    """The part's JSON, rewritten (atomically) after every change."""

    def __init__(self, path: Path, header: dict[str, Any], deadline_s: float):
        self.path = path
        self.data: dict[str, Any] = {**header, "cases": {}, "skipped": [], "disk": [], "errors": {}}
        self.t0 = time.monotonic()
        self.deadline_s = deadline_s
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)

    def case(self, name: str, fn: Callable[..., Any], *args: Any, append: bool = False, **kwargs: Any) -> None:
        """``fn(*args, **kwargs)`` as case ``name`` unless the part's deadline has passed; record its result, or
        its error (the part goes on: one failure on a lent machine must not cost the other figures), and save."""
        if time.monotonic() - self.t0 > self.deadline_s:
            self.data["skipped"].append(name)
            self.save()
            return
        t0 = time.monotonic()
        try:
            value = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - recorded in the JSON; gpu_check exits non-zero at the end
            self.data["errors"].setdefault(name, []).append(
                f"{type(e).__name__}: {e}"[-3000:] + "\n" + traceback.format_exc()[-3000:])
            self.save()
            return
        if append:
            self.data["cases"].setdefault(name, []).append(value)
        else:
            self.data["cases"][name] = value
        self.data.setdefault("case_seconds", {})[name] = round(
            self.data.get("case_seconds", {}).get(name, 0) + time.monotonic() - t0, 1)
        self.save()

    def require_disk(self, path: Path, need_bytes: float, what: str) -> None:
        """Check the free space under ``path`` before writing ``need_bytes`` (with a 10% margin)."""
        free = shutil.disk_usage(path).free
        self.data["disk"].append({"what": what, "path": str(path), "need_gb": round(need_bytes / GB, 2),
                                  "free_gb": round(free / GB, 2)})
        self.save()
        if free < 1.1 * need_bytes:
            raise DiskBudgetError(f"{what}: needs {need_bytes / GB:.1f} GB (+10%) under {path}, {free / GB:.1f} GB "
                                  "free; set TMPDIR to a larger disk")


class DiskBudgetError(RuntimeError):
    pass


def device_memory() -> dict[str, float] | None:
    """Device-wide used memory (all processes: vLLM's engine core too), from ``cudaMemGetInfo``."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return {"used_gb": round((total - free) / 2**30, 2), "total_gb": round(total / 2**30, 2)}


# --- train ---------------------------------------------------------------------------------------------------------


def save_student(shape: str, vocab: int, out: Path, device: str) -> Path:
    """A random-init student in bf16 on ``device`` (fp32 on CPU), saved as an HF dir with the demo tokenizer."""
    from pipeline.demo.world import build_tokenizer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lm = qwen3_model(shape, vocab, dtype=dtype, device=device)
    lm.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    del lm
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def torchrun_train(report: Report, tmp: Path, shape: str, vocab: int, nproc: int, min_len: int, max_len: int,
                   rows: int, batch: int, budget: int, precision: str, device: str) -> dict[str, Any]:
    """``lopd train`` under ``torchrun`` (``python -m torch.distributed.run``), FSDP2, activation checkpointing, a
    token budget, on ragged synthetic rows: launch 1 runs 2 steps and checkpoints, launch 2 resumes from that
    checkpoint and runs step 3. Per-step figures come from the run's own metrics."""
    import yaml

    from storage.codecs import encode_records
    from storage.shardset import ShardSet

    params = param_count(shape, vocab)
    weight_bytes = params * (2 if device == "cuda" else 4)
    ckpt_bytes = params * 12  # fp32 weights + Adam's two moments
    report.require_disk(tmp, 2 * weight_bytes + 2 * ckpt_bytes, "torchrun_train (student, final model, 2 checkpoints)")
    student = save_student(shape, vocab, tmp / f"student-{shape}", device)
    k = 8
    shards = ShardSet.create(tmp / "topk", "teacher_topk", {"k": k, "vocab_size": vocab})
    records = ragged_records(min_len, max_len, vocab, rows, k=k)
    per_shard = max(1, rows // 4)
    for i in range(0, rows, per_shard):
        shards.write_shard(i // per_shard, encode_records(records[i:i + per_shard], "plain", k, vocab),
                           row_group_size=1)
    shards.finalize(expected_shards=-(-rows // per_shard))
    out = tmp / "train"
    cfg = {"run_dir": str(tmp), "train": {
        "student": str(student), "shards": str(shards.root), "out": str(out),
        "losses": {"reverse_kl_topk": 1.0, "lightning": 0.1}, "batch_size": batch, "fsdp": True,
        "precision": precision, "activation_checkpointing": True, "max_tokens_per_micro_batch": budget,
        "checkpoint_every": 2, "keep_checkpoints": 1, "log_every": 1, "deterministic": False,
        "dist_timeout_minutes": 5}}
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    result: dict[str, Any] = {"shape": shape, "params": params, "nproc": nproc, "rows_tokens": [min_len, max_len],
                              "batch": batch, "budget": budget, "precision": precision, "launch_seconds": [],
                              "resumed_from_step": 2}
    for steps in (2, 3):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                              str(nproc), "-m", "lopd.cli", "train", "-c", str(tmp / "run.yaml"), "-q", "--set",
                              f"train.steps={steps}"],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if res.returncode != 0:  # rank 0's own lines first: torchrun's summary at the end names no cause
            rank0 = "\n".join(line for line in res.stderr.splitlines() if line.startswith("[rank0]"))
            raise RuntimeError(f"torchrun lopd train (steps={steps}) failed:\n{rank0[-4000:]}\n{res.stderr[-1500:]}")
        result["launch_seconds"].append(round(time.perf_counter() - t0, 1))
        report.data["cases"]["torchrun_train"] = result  # launch 1's figures survive a stop during launch 2
        report.save()
    keep = ("step", "loss/total", "perf/tokens_per_s", "perf/mfu", "perf/peak_mem_gb", "perf/padding_frac",
            "micro/per_rank", "micro/added", "micro/idle")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result["steps"] = [{key: m.get(key) for key in keep} for m in metrics]
    result["final_model"] = (out / "final" / "config.json").exists()
    result["checkpoints_left"] = sorted(p.name for p in (out / "ckpt").iterdir()) if (out / "ckpt").exists() else []
    return result


def train_steps(shape: str, T: int, loss: str, steps: int, device: str, vocab: int, batch: int,
                precision: str) -> dict[str, Any]:
    """Full optimiser steps of a random-init student on one device, the trainer's own step function; the model
    is built in fp32 (the trainer's master weights) directly on the device."""
    from pipeline.config import TrainConfig
    from pipeline.progress import log
    from pipeline.train.batching import prepare_step
    from pipeline.train.distributed import DistInfo
    from pipeline.train.loop import make_optimizer, train_step
    from pipeline.train.metrics import StepMeter, detect_peak_tflops
    from pipeline.train.objective import OpdObjective
    from pipeline.train.student import count_flop_params, prepare_student

    dev = torch.device(device)
    cfg = TrainConfig(student="s", shards="d", out="o", losses={loss: 1.0}, batch_size=batch, precision=precision,
                      activation_checkpointing=True)
    lm = qwen3_model(shape, vocab, device=device)
    student = prepare_student(lm, DistInfo(), fsdp=False, precision=precision, activation_checkpointing=True)
    opt = make_optimizer(student, cfg.optim)
    peak = detect_peak_tflops(dev, precision)
    meter = StepMeter(count_flop_params(lm), 1, peak)
    micro_batches = prepare_step(synthetic_records(T, vocab, batch), cfg, 0)  # the same every step
    times = []
    for step in range(steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(student, opt, OpdObjective(cfg), micro_batches, cfg, cfg.optim.grad_clip, DistInfo(), dev, meter)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        log.info("gpu-check: %s T=%d %s step %d: %.2fs", shape, T, loss, step, times[-1])
    later = sorted(times[1:]) or times
    step_s = later[len(later) // 2]
    tokens = batch * T
    out = {"shape": shape, "T": T, "loss": loss, "batch": batch, "precision": precision, "steps": steps,
           "step_seconds": round(step_s, 3), "first_step_seconds": round(times[0], 3),
           "tokens_per_s": round(tokens / step_s, 1), "params": sum(p.numel() for p in lm.parameters()),
           "mfu": round(6 * count_flop_params(lm) * tokens / step_s / (peak * 1e12), 4) if peak else None,
           "max_memory_allocated_gb": (round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda"
                                       else None)}
    del student, opt, lm
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def run_train(report: Report, s: Shapes) -> None:
    with tempfile.TemporaryDirectory() as tmp:  # model dirs and checkpoints stay outside the output folder
        report.case("torchrun_train", torchrun_train, report, Path(tmp), vocab=s.vocab, device=s.device, **s.torchrun)
    for T in s.train_lengths:
        for loss in ("lightning", "reverse_kl_topk"):
            report.case("train", train_steps, s.train_shape, T, loss, s.train_steps, s.device, s.vocab, s.train_batch,
                        s.precision, append=True)


# --- head ----------------------------------------------------------------------------------------------------------


def micro_batch_memory(lm: torch.nn.Module, shape: str, T: int, loss: str, device: str, vocab: int,
                       batch: int) -> dict[str, Any]:
    """One forward+backward of a ``batch``-sequence micro-batch through the chunked head with activation
    checkpointing: the peak above weights and their gradients is the activations + loss path that must fit next
    to a rank's shard of the model and optimiser."""
    from pipeline.config import TrainConfig
    from pipeline.train.batching import collate
    from pipeline.train.objective import micro_batch_loss
    from pipeline.train.student import StudentLM

    dev = torch.device(device)
    cfg = TrainConfig(student="s", shards="d", out="o", losses={loss: 1.0})
    mb = collate(synthetic_records(T, vocab, batch), pad_id=0).to(dev)
    mask = mb.mask_B_T.bool()
    weights = sum(p.numel() * p.element_size() for p in lm.parameters())
    lm.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    value, _ = micro_batch_loss(StudentLM(lm), cfg, mb, mask.sum().float(), mask.any(-1).sum().float())
    value.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"shape": shape, "T": T, "loss": loss, "micro_batch": batch, "seconds": round(seconds, 3),
           "weights_gb": round(weights / 2**30, 2), "loss_value": float(value.detach())}
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base  # gradients (weights' size) + activations + loss path
        out.update({"peak_above_weights_gb": round(peak / 2**30, 2),
                    "activations_and_loss_path_gb": round((peak - weights) / 2**30, 2),
                    "fits_40gb_budget": (peak - weights) <= 40 * 2**30})
    del mb, value
    lm.zero_grad(set_to_none=True)
    return out


def run_head(report: Report, s: Shapes) -> None:
    dtype = torch.bfloat16 if s.device == "cuda" else torch.float32
    holder: dict[str, torch.nn.Module] = {}

    def build() -> dict[str, Any]:
        t0 = time.perf_counter()
        lm = qwen3_model(s.big_shape, s.vocab, dtype=dtype, device=s.device)  # bf16, on the GPU: no host copy
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.config.use_cache = False
        lm.train()
        holder["lm"] = lm
        return {"shape": s.big_shape, "dtype": str(dtype), "seconds": round(time.perf_counter() - t0, 1),
                "device_memory": device_memory()}

    report.case("build_8b", build)
    for T in s.big_lengths:
        for loss in ("lightning", "reverse_kl_topk"):
            if "lm" in holder:
                report.case("micro_batch_8b", micro_batch_memory, holder["lm"], s.big_shape, T, loss, s.device,
                            s.vocab, 4, append=True)
    holder.clear()
    if s.device == "cuda":
        torch.cuda.empty_cache()
    report.case("head_weight_grad", bench_head_weight_grad, device=s.device, **s.head)


# --- score ---------------------------------------------------------------------------------------------------------


def vllm_scoring(model_dir: str, T: int, n: int, ks: list[int], budget: int, cpu: bool, out: str) -> None:
    """In its own process: one vLLM engine scoring ``n`` random sequences of ``T`` tokens per k; device memory
    from ``mem_get_info`` deltas around it (vLLM runs the model in its engine-core process, so this process's
    allocator never sees it). Writes ``out`` after each k."""
    from pipeline.config import EngineConfig
    from pipeline.engines.vllm_engine import VLLMEngine
    from pipeline.models import load_tokenizer

    before = device_memory()
    rng = torch.Generator().manual_seed(0)  # ids the (small) tokenizer knows: vLLM checks prompts against it
    seqs = [torch.randint(3, len(load_tokenizer(model_dir)), (T,), generator=rng).tolist() for _ in range(n)]
    cfg = EngineConfig(name="vllm", dtype="bfloat16", max_model_len=T + 16, max_num_batched_tokens=budget,
                       enforce_eager=cpu, gpu_memory_utilization=0.85)
    t0 = time.perf_counter()
    rows: dict[str, Any] = {"device_memory_before": before, "rows": []}
    with VLLMEngine(model_dir, cfg, max_logprobs=max(ks)) as engine:
        rows["init_seconds"] = round(time.perf_counter() - t0, 1)
        rows["device_memory_after_init"] = device_memory()
        rows["v2_model_runner"] = bool(engine.llm.llm_engine.vllm_config.use_v2_model_runner) if engine.llm else None
        for k in ks:
            t0 = time.perf_counter()
            engine.score(seqs, [64] * n, k)
            seconds = time.perf_counter() - t0
            rows["rows"].append({"T": T, "sequences": n, "k": k, "max_num_batched_tokens": budget,
                                 "seconds": round(seconds, 2), "tokens_per_s": round(n * (T - 64) / seconds, 1),
                                 "device_memory": device_memory()})
            Path(out).write_text(json.dumps(rows))
    Path(out).write_text(json.dumps(rows))


def run_score(report: Report, s: Shapes) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        report.data["skipped"].append("score: vLLM is not installed here (pip install 'lopd[gpu]')")
        report.save()
        return
    a = s.score
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / f"teacher-{a['shape']}"
        dtype_bytes = 2 if s.device == "cuda" else 4

        def build() -> dict[str, Any]:
            report.require_disk(Path(tmp), param_count(a["shape"], s.vocab) * dtype_bytes, "score (teacher dir)")
            t0 = time.perf_counter()
            save_student(a["shape"], s.vocab, model_dir, s.device)
            return {"shape": a["shape"], "seconds": round(time.perf_counter() - t0, 1)}

        report.case("build_teacher", build)
        if "build_teacher" not in report.data["cases"]:
            return
        out = Path(tmp) / "vllm.json"
        args = {"model_dir": str(model_dir), "T": a["T"], "n": a["n"], "ks": list(a["ks"]), "budget": a["budget"],
                "cpu": s.device == "cpu", "out": str(out)}

        def score() -> dict[str, Any]:
            res = subprocess.run([sys.executable, "-m", "pipeline.bench.gpu_check", "vllm-scoring", json.dumps(args)])
            if res.returncode != 0:  # what it measured before it failed still goes into the report
                report.data["cases"]["vllm_partial"] = json.loads(out.read_text()) if out.exists() else None
                raise RuntimeError(f"vLLM scoring exited {res.returncode}")
            return json.loads(out.read_text())

        report.case("vllm", score)


# --- parity --------------------------------------------------------------------------------------------------------


def parity_run(tmp: Path, runner: str) -> dict[str, Any]:
    """``pipeline.bench.parity`` in its own process, with ``VLLM_USE_V2_MODEL_RUNNER=runner`` unless "default"."""
    out = tmp / f"parity-{runner}.json"
    env = dict(os.environ)
    if runner != "default":
        env["VLLM_USE_V2_MODEL_RUNNER"] = runner
    res = subprocess.run([sys.executable, "-m", "pipeline.bench.parity", "--out", str(out),
                          "--model-dir", str(tmp / "model")], env=env)
    if res.returncode != 0:
        raise RuntimeError(f"pipeline.bench.parity (VLLM_USE_V2_MODEL_RUNNER={runner}) exited {res.returncode}")
    return {"VLLM_USE_V2_MODEL_RUNNER": runner, **json.loads(out.read_text())}


def run_parity(report: Report, s: Shapes) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        report.data["skipped"].append("parity: vLLM is not installed here")
        report.save()
        return
    runners = ("0", "1") if s.device == "cuda" else ("default",)
    with tempfile.TemporaryDirectory() as tmp:
        for runner in runners:
            report.case("parity", parity_run, Path(tmp), runner, append=True)


# --- entry point ---------------------------------------------------------------------------------------------------


RUNNERS = {"train": run_train, "head": run_head, "score": run_score, "parity": run_parity}


def gpu_check(out_dir: Path, parts: list[str], cpu_smoke: bool = False, deadline_s: float = 420.0) -> dict[str, Any]:
    """Run ``parts`` in order, each into ``<out_dir>/gpu-check-<part>.json``; returns {part: its JSON}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA GPU; use --cpu-smoke to exercise it on CPU")
    shapes = Shapes.for_mode(cpu_smoke)
    import transformers

    header = {"device": torch.cuda.get_device_name() if not cpu_smoke else "cpu (smoke test)",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "python": sys.version.split()[0], "cpu_smoke": cpu_smoke}
    results = {}
    for part in parts:
        report = Report(out_dir / f"gpu-check-{part}.json", {**header, "part": part}, deadline_s)
        RUNNERS[part](report, shapes)
        report.data["done"] = True
        report.save()
        results[part] = report.data
    return results


def main(argv: list[str]) -> None:
    if argv and argv[0] == "vllm-scoring":
        vllm_scoring(**json.loads(argv[1]))
        return
    import argparse

    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-out")),
                        help="directory for gpu-check-<part>.json (default: $OUT)")
    parser.add_argument("--part", action="append", choices=PARTS,
                        help="part to run (repeatable); default: all of them (train, head, score, parity)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (CI keeps the script working)")
    parser.add_argument("--deadline-s", type=float, default=420.0,
                        help="start no new case after this many seconds of a part (default 420: a part stays "
                        "inside an 8-minute command)")
    args = parser.parse_args(argv)
    results = gpu_check(args.out, args.part or list(PARTS), args.cpu_smoke, args.deadline_s)
    print(json.dumps({p: {"cases": sorted(r["cases"]), "skipped": r["skipped"], "errors": sorted(r["errors"]),
                          "elapsed_s": r["elapsed_s"]} for p, r in results.items()}, indent=2))
    if any(r["errors"] for r in results.values()):
        raise SystemExit(f"gpu-check: errors recorded in {args.out}/gpu-check-<part>.json")


if __name__ == "__main__":
    main(sys.argv[1:])
