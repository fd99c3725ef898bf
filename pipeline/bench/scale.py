"""Benchmarks of the trainer at the recipe's scale (JSON; never run as timed tests).

``bench_train_memory`` (``lopd bench train-memory --json``): one forward+backward step of a random-init
Qwen3-shaped student (vocab 151,936) per (sequence length, loss), through the old full-logit path (the Hugging Face
forward's B x T x V logits, upcast to fp32, losses on them), through the chunked LM head, and through the chunked
head with activation checkpointing (``_ckpt``: how the trainer runs at scale). Each case runs in its
own process, so its peak memory is its own: peak RSS during the step minus RSS before it (on CPU), or
``max_memory_allocated`` minus memory before the step (on a GPU). Loss and gradients of the two paths are compared
(gradients on every decoder parameter, and on 4,096 sampled rows of the LM head).

``gpu_check`` (``scripts/gpu-check.sh``): on one GPU, first the code path users run on an 8-GPU node: ``lopd train``
under ``torchrun --nproc-per-node 1`` with FSDP2, bf16, activation checkpointing, variable-length rows and a token
budget, a DCP checkpoint and a resume from it (a 1.7B-shaped student); then bf16 + activation checkpointing in one
process: the 1.7B-shaped student taking full optimiser steps (step time, tokens/s, MFU, peak memory), an 8B-shaped
student's forward+backward of one 4-sequence micro-batch (peak memory of activations + loss path), the head's
weight-gradient accumulation before/after the fused addmm, and vLLM scoring of an 8B-shaped teacher in its own
process. ``--cpu-smoke`` runs the same code on tiny shapes on CPU, the torchrun part on 2 gloo ranks (CI does).
Model directories go to a temporary directory outside the output folder.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

QWEN3_VOCAB = 151_936
LOSSES = ("lightning", "reverse_kl_topk", "forward_kl_topk", "jsd_topk", "tvd_topk", "sft")

# Qwen3 shapes (config.json of the public checkpoints): hidden, layers, heads, kv heads, intermediate, tied.
SHAPES: dict[str, dict[str, Any]] = {
    "bench-1024": dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=8,
                       intermediate_size=3072, tie_word_embeddings=False),
    "qwen3-1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       intermediate_size=6144, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=12288, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=128, tie_word_embeddings=False),
}


def qwen3_model(shape: str, vocab: int = QWEN3_VOCAB, dtype: torch.dtype = torch.float32,
                device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    """A random-init Qwen3-shaped causal LM (no download: built from a config)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    head_dim = 32 if shape == "tiny" else 128
    config = Qwen3Config(vocab_size=vocab, head_dim=head_dim, max_position_embeddings=40_960, **SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    return model


def synthetic_records(T: int, vocab: int, batch: int = 1, k: int = 20, prompt_len: int = 64, seed: int = 0):
    """``batch`` records of T tokens (``prompt_len`` prompt) with a synthetic teacher: per position k distinct
    top-k ids (a random start, then a stride coprime to the vocabulary sizes used here), their log-probs and a
    tail, behaviour log-probs 0.1 below the teacher's."""
    import numpy as np

    from storage.records import TeacherRecord

    rng = np.random.default_rng(seed)
    n = T - prompt_len
    records = []
    for b in range(batch):
        logits = rng.standard_normal((n, k + 1)).astype(np.float32) * 2
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ids = ((rng.integers(0, vocab, n)[:, None] + 7919 * np.arange(k)[None, :]) % vocab).astype(np.int32)
        records.append(TeacherRecord(prompt_id=str(b), sample_index=0,
                                     token_ids=rng.integers(0, vocab, size=T).astype(np.int32), prompt_len=prompt_len,
                                     teacher_logprobs=logp[:, 0].copy(), behavior_logprobs=(logp[:, 0] - 0.1).copy(),
                                     topk_ids=ids, topk_logprobs=logp[:, :k].copy(), tail_logprob=logp[:, k].copy(),
                                     reward=None))
    return records


def ragged_records(min_len: int, max_len: int, vocab: int, n: int, k: int = 8, seed: int = 0):
    """``n`` synthetic records whose lengths are spread over [min_len, max_len] (``synthetic_records`` of each
    length): rows that ranks split into different numbers of micro-batches under a token budget."""
    import dataclasses

    import numpy as np

    lengths = np.random.default_rng(seed).integers(min_len, max_len + 1, n)
    return [dataclasses.replace(synthetic_records(int(T), vocab, 1, k=k, prompt_len=16, seed=seed + i)[0],
                                prompt_id=str(i))
            for i, T in enumerate(lengths)]


def torchrun_train(shape: str, vocab: int, nproc: int, min_len: int, max_len: int, rows: int, batch: int,
                   budget: int, precision: str, tmp: Path) -> dict[str, Any]:
    """``lopd train`` under ``torchrun --nproc-per-node nproc``, FSDP2, activation checkpointing, a token budget, on
    ragged synthetic rows: 2 steps with a DCP checkpoint, then a second launch that resumes from it to step 4. The
    figures per step come from the run's own metrics (tokens/s, MFU, peak memory, micro-batches the ranks added to
    agree)."""
    import yaml

    from pipeline.demo.world import build_tokenizer
    from storage.codecs import encode_records
    from storage.shardset import ShardSet

    student = tmp / f"student-{shape}"
    qwen3_model(shape, vocab).save_pretrained(student)
    build_tokenizer().save_pretrained(student)
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
        "checkpoint_every": 2, "log_every": 1, "deterministic": False, "dist_timeout_minutes": 5}}
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    torchrun = Path(sys.executable).with_name("torchrun")
    launches = []
    for steps in (2, 4):
        t0 = time.perf_counter()
        res = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", str(nproc), "-m", "lopd.cli", "train",
                              "-c", str(tmp / "run.yaml"), "-q", "--set", f"train.steps={steps}"],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if res.returncode != 0:
            raise RuntimeError(f"torchrun lopd train (steps={steps}) failed:\n{res.stderr[-4000:]}")
        launches.append(round(time.perf_counter() - t0, 1))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keep = ("step", "loss/total", "perf/tokens_per_s", "perf/mfu", "perf/peak_mem_gb", "perf/padding_frac",
            "micro/per_rank", "micro/added", "micro/idle")
    return {"shape": shape, "nproc": nproc, "rows_tokens": [min_len, max_len], "batch": batch, "budget": budget,
            "precision": precision, "launch_seconds": launches, "resumed_from_step": 2,
            "steps": [{key: m.get(key) for key in keep} for m in metrics],
            "final_model": (out / "final" / "config.json").exists()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def full_logits_loss(cfg, lm: torch.nn.Module, batch) -> torch.Tensor:
    """The old path: the model's full B x T x V logits, upcast to fp32, per-token stats over all of them, then
    the same losses on the selected tokens."""
    from pipeline.config import TOPK_LOSSES
    from pipeline.train.batching import flatten_targets
    from pipeline.train.head import token_stats
    from pipeline.train.objective import compute_losses

    mask_B_T = batch.mask_B_T.bool()
    logits_B_T_V = lm(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_B_L).logits[:, :-1].float()
    need_topk = bool(set(cfg.losses) & TOPK_LOSSES)
    ids = batch.topk_ids_B_T_K.masked_fill(~mask_B_T.unsqueeze(-1), 0) if need_topk else None
    stats = token_stats(logits_B_T_V, batch.input_ids_B_L[:, 1:], ids)[mask_B_T]
    n = int(mask_B_T.sum())
    loss, _ = compute_losses(cfg, stats[None], flatten_targets(batch).rows(0, n), torch.ones(1, n, dtype=torch.bool),
                             mask_B_T.sum().float(), mask_B_T.any(-1).sum().float())
    return loss


def run_case(T: int, loss: str, path: str, shape: str, vocab: int, out: Path, chunk_tokens: int | None = None) -> dict:
    """One (T, loss, path) forward+backward in this process; writes loss, sampled gradients and memory to ``out``."""
    from pipeline.config import TrainConfig
    from pipeline.train.batching import collate
    from pipeline.train.objective import micro_batch_loss
    from pipeline.train.student import StudentLM

    torch.set_num_threads(int(os.environ.get("LOPD_BENCH_THREADS", torch.get_num_threads())))
    cfg = TrainConfig(student="s", shards="d", out="o", losses={loss: 1.0}, logits_chunk_tokens=chunk_tokens)
    lm = qwen3_model(shape, vocab)
    lm.train()
    if path == "chunked_ckpt":  # the trainer's path at scale: chunked head + activation checkpointing
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = collate(synthetic_records(T, vocab), pad_id=0)
    mask = batch.mask_B_T.bool()
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    if path == "full":
        value = full_logits_loss(cfg, lm, batch)
    else:
        value, _ = micro_batch_loss(StudentLM(lm), cfg, batch, mask.sum().float(), mask.any(-1).sum().float())
    value.backward()
    seconds = time.perf_counter() - t0
    peak = _peak_rss_bytes() - rss_before
    rows = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:4096]
    grads = {name: p.grad.detach().clone() for name, p in lm.named_parameters()
             if p.grad is not None and "embed_tokens" not in name and "lm_head" not in name}
    grads["lm_head.sampled_rows"] = lm.lm_head.weight.grad[rows].clone()
    torch.save({"loss": float(value.detach()), "grads": grads}, out.with_suffix(".pt"))
    result = {"T": T, "loss": loss, "path": path, "peak_bytes": peak, "seconds": seconds,
              "tokens": int(mask.sum())}
    out.write_text(json.dumps(result))
    return result


def bench_head_weight_grad(vocab: int = QWEN3_VOCAB, hidden: int = 4096, tokens: int = 2048,
                           chunk_tokens: int | None = None, device: str | None = None, repeats: int = 3
                           ) -> dict[str, Any]:
    """The chunked head's weight-gradient accumulation (``head.accumulate_weight_grad``) over ``tokens`` tokens in
    chunks, bf16 inputs into an fp32 V x H gradient: the two-step form (bf16 product, then an fp32 add) against the
    fused ``addmm(out_dtype=float32)``, time and peak memory of each and the largest difference of the gradients.
    The fused kernel exists on CUDA only: on CPU only the two-step form is measured."""
    from pipeline.train.head import accumulate_weight_grad, default_chunk_tokens

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    chunk = chunk_tokens or default_chunk_tokens(vocab)
    gen = torch.Generator(device=dev).manual_seed(0)
    g_N_V = (torch.randn(tokens, vocab, device=dev, generator=gen) * 1e-3).to(torch.bfloat16)
    h_N_H = torch.randn(tokens, hidden, device=dev, generator=gen).to(torch.bfloat16)
    out: dict[str, Any] = {"vocab": vocab, "hidden": hidden, "tokens": tokens, "chunk_tokens": chunk,
                           "device": str(dev)}
    grads = {}
    for fused in ([False, True] if dev.type == "cuda" else [False]):
        grad_V_H = torch.zeros(vocab, hidden, dtype=torch.float32, device=dev)
        times = []
        for _ in range(repeats):
            grad_V_H.zero_()
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for start in range(0, tokens, chunk):
                accumulate_weight_grad(grad_V_H, g_N_V[start:start + chunk], h_N_H[start:start + chunk], fused=fused)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        name = "fused" if fused else "two_step"
        out[name] = {"seconds": round(min(times), 4),
                     "peak_extra_gb": (round((torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated())
                                             / 2**30, 3) if dev.type == "cuda" else None)}
        grads[name] = grad_V_H
    if "fused" in grads:
        out["max_abs_diff"] = float((grads["fused"] - grads["two_step"]).abs().max())
        out["max_abs"] = float(grads["two_step"].abs().max())
        out["speedup"] = round(out["two_step"]["seconds"] / out["fused"]["seconds"], 2)
    else:
        out["fused"] = None
    return out


def bench_train_memory(lengths: tuple[int, ...] = (1024, 4096, 8192), losses: tuple[str, ...] = LOSSES,
                       shape: str = "bench-1024", vocab: int = QWEN3_VOCAB, max_full_tokens: int = 4096,
                       chunk_tokens: int | None = None) -> dict[str, Any]:
    """Old full-logit path vs chunked head, one process per case. The full path is run up to
    ``max_full_tokens`` (beyond it its B x T x V tensors do not fit a 24 GiB machine; it is reported as null)."""
    cases = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for T in lengths:
            for loss in losses:
                row: dict[str, Any] = {"T": T, "loss": loss}
                results = {}
                for path in ("full", "chunked", "chunked_ckpt"):
                    if path == "full" and T > max_full_tokens:
                        continue
                    out = tmp / f"{T}-{loss}-{path}.json"
                    subprocess.run([sys.executable, "-m", "pipeline.bench.scale", "case", str(T), loss, path, shape,
                                    str(vocab), str(out), str(chunk_tokens or 0)], check=True)
                    results[path] = (json.loads(out.read_text()), torch.load(out.with_suffix(".pt")))
                chunked, ckpt = results["chunked"][0], results["chunked_ckpt"][0]
                row.update({"tokens": chunked["tokens"], "peak_bytes_chunked": chunked["peak_bytes"],
                            "tokens_per_s_chunked": round(chunked["tokens"] / chunked["seconds"], 1),
                            "peak_bytes_chunked_ckpt": ckpt["peak_bytes"],
                            "tokens_per_s_chunked_ckpt": round(ckpt["tokens"] / ckpt["seconds"], 1),
                            "ckpt_grads_equal_chunked": all(
                                torch.equal(results["chunked"][1]["grads"][k], results["chunked_ckpt"][1]["grads"][k])
                                for k in results["chunked"][1]["grads"])})
                if "full" in results:
                    full, full_data = results["full"]
                    chunk_data = results["chunked"][1]
                    num = sum(float((full_data["grads"][k] - chunk_data["grads"][k]).pow(2).sum())
                              for k in full_data["grads"])
                    den = sum(float(full_data["grads"][k].pow(2).sum()) for k in full_data["grads"])
                    row.update({"peak_bytes_full": full["peak_bytes"],
                                "ratio": round(chunked["peak_bytes"] / full["peak_bytes"], 4),
                                "ratio_ckpt": round(ckpt["peak_bytes"] / full["peak_bytes"], 4),
                                "loss_rel_diff": (abs(chunk_data["loss"] - full_data["loss"])
                                                  / max(abs(full_data["loss"]), 1e-12)),
                                "grad_rel_diff": (num / max(den, 1e-30)) ** 0.5,
                                "tokens_per_s_full": round(full["tokens"] / full["seconds"], 1),
                                "speed_ratio": round(full["seconds"] / chunked["seconds"], 3)})
                else:
                    row.update({"peak_bytes_full": None, "ratio": None, "ratio_ckpt": None, "loss_rel_diff": None,
                                "grad_rel_diff": None,
                                "tokens_per_s_full": None, "speed_ratio": None})
                cases.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    def growth(key: str) -> dict[str, float]:
        by_loss: dict[str, dict[int, int]] = {}
        for c in cases:
            by_loss.setdefault(c["loss"], {})[c["T"]] = c[key]
        return {loss: round(v[max(v)] / v[min(v)], 3) for loss, v in by_loss.items() if len(v) > 1}

    from pipeline.train.head import default_chunk_tokens

    head_grad = (bench_head_weight_grad() if torch.cuda.is_available()
                 else bench_head_weight_grad(vocab=vocab, hidden=256, tokens=4 * (chunk_tokens or 64),
                                             chunk_tokens=chunk_tokens))
    return {"bench": "train-memory", "shape": shape, "vocab": vocab,
            "chunk_tokens": chunk_tokens or default_chunk_tokens(vocab),
            "threads": torch.get_num_threads(), "cases": cases, "head_weight_grad": head_grad,
            "chunked_peak_growth_longest_vs_shortest": growth("peak_bytes_chunked"),
            "chunked_ckpt_peak_growth_longest_vs_shortest": growth("peak_bytes_chunked_ckpt")}


# --- the GPU check -----------------------------------------------------------------------------


def _train_steps(shape: str, T: int, loss: str, steps: int, device: str, vocab: int, batch: int,
                 precision: str) -> dict[str, Any]:
    """Full optimiser steps of a random-init student on one device, the trainer's own step function."""
    from pipeline.config import TrainConfig
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
    meter = StepMeter(count_flop_params(lm), 1, detect_peak_tflops(dev, precision))
    records = synthetic_records(T, vocab, batch)

    micro_batches = prepare_step(records, cfg, 0)  # the same every step: this measures the step, not the data path
    from pipeline.progress import log

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
    step_s = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    tokens = batch * T
    peak = detect_peak_tflops(dev, precision)
    out = {"shape": shape, "T": T, "loss": loss, "batch": batch, "precision": precision, "steps": steps,
           "step_seconds": round(step_s, 3), "tokens_per_s": round(tokens / step_s, 1),
           "params": sum(p.numel() for p in lm.parameters()),
           "mfu": round(6 * count_flop_params(lm) * tokens / step_s / (peak * 1e12), 4) if peak else None,
           "max_memory_allocated_gb": (round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda"
                                       else None)}
    del student, opt, lm
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def _micro_batch_memory(shape: str, T: int, loss: str, device: str, vocab: int, batch: int) -> dict[str, Any]:
    """One forward+backward of a ``batch``-sequence micro-batch with bf16 weights (what an FSDP2 rank computes
    with after the all-gather) and activation checkpointing: the peak above weights and gradients is the
    activations + loss path that must fit next to a rank's shard of the model and optimiser."""
    from pipeline.config import TrainConfig
    from pipeline.train.batching import collate
    from pipeline.train.objective import micro_batch_loss
    from pipeline.train.student import StudentLM

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    lm = qwen3_model(shape, vocab, dtype=dtype, device=device)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    lm.train()
    cfg = TrainConfig(student="s", shards="d", out="o", losses={loss: 1.0})
    mb = collate(synthetic_records(T, vocab, batch), pad_id=0).to(dev)
    mask = mb.mask_B_T.bool()
    weights = sum(p.numel() * p.element_size() for p in lm.parameters())
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
        peak = torch.cuda.max_memory_allocated() - base
        out.update({"peak_above_weights_gb": round(peak / 2**30, 2),
                    "activations_and_loss_path_gb": round((peak - weights) / 2**30, 2),
                    "fits_40gb_budget": (peak - weights) <= 40 * 2**30})
    del lm, mb, value
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _vllm_scoring(shape: str, T: int, n: int, ks: tuple[int, ...], budgets: tuple[int, ...], vocab: int,
                  tmp: Path, cpu: bool) -> list[dict[str, Any]]:
    """vLLM scoring (prompt log-probs, top-k) of a random-init teacher saved as an HF dir, per k and token budget."""
    from transformers import PreTrainedTokenizerFast

    from pipeline.config import EngineConfig
    from pipeline.demo.world import build_tokenizer
    from pipeline.engines.vllm_engine import VLLMEngine

    model_dir = tmp / f"teacher-{shape}"
    lm = qwen3_model(shape, vocab, dtype=torch.bfloat16)
    lm.save_pretrained(model_dir)
    del lm
    tok: PreTrainedTokenizerFast = build_tokenizer()
    tok.save_pretrained(model_dir)
    rng = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, len(tok), (T,), generator=rng).tolist() for _ in range(n)]
    rows = []
    for budget in budgets:
        cfg = EngineConfig(name="vllm", dtype="bfloat16", max_model_len=T + 16, max_num_batched_tokens=budget,
                           enforce_eager=cpu, gpu_memory_utilization=0.85)
        engine = VLLMEngine(str(model_dir), cfg, max_logprobs=max(ks))
        try:
            for k in ks:
                t0 = time.perf_counter()
                engine.score(seqs, [64] * n, k)
                seconds = time.perf_counter() - t0
                rows.append({"shape": shape, "T": T, "sequences": n, "k": k, "max_num_batched_tokens": budget,
                             "seconds": round(seconds, 2), "tokens_per_s": round(n * (T - 64) / seconds, 1),
                             "max_memory_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                             if torch.cuda.is_available() else None})
        finally:
            engine.close()
    return rows


def gpu_check(out_dir: Path, cpu_smoke: bool = False, skip_vllm: bool = False) -> dict[str, Any]:
    """The scale figures on one GPU (or, with ``cpu_smoke``, the same code on tiny shapes on CPU)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cpu" if cpu_smoke else "cuda"
    if not cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA GPU; use --cpu-smoke to exercise it on CPU")
    if cpu_smoke:
        train_shape, big_shape, vocab, lengths, steps, batch = "tiny", "tiny", 1024, (128, 256), 2, 2
        vllm_args = dict(shape="tiny", T=128, n=4, ks=(4,), budgets=(256,))
        torchrun_args = dict(shape="tiny", vocab=1024, nproc=2, min_len=20, max_len=128, rows=16, batch=8, budget=150,
                             precision="fp32")
        head_args = dict(vocab=1024, hidden=64, tokens=256, chunk_tokens=64)
    else:
        train_shape, big_shape, vocab, lengths, steps, batch = "qwen3-1.7b", "qwen3-8b", QWEN3_VOCAB, (4096, 8192), 4, 4
        vllm_args = dict(shape="qwen3-8b", T=6144, n=64, ks=(20, 128), budgets=(4096, 16384))
        torchrun_args = dict(shape="qwen3-1.7b", vocab=QWEN3_VOCAB, nproc=1, min_len=1024, max_len=4096, rows=32,
                             batch=8, budget=16384, precision="bf16")
        head_args = dict(vocab=QWEN3_VOCAB, hidden=4096, tokens=2048)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if not cpu_smoke else "cpu (smoke test)",
                              "torch": torch.__version__, "torchrun_train": None, "train": [], "micro_batch_8b": [],
                              "head_weight_grad": None, "vllm": []}

    def save() -> None:  # after every case, so a run cut short by its time limit still reports what it measured
        (out_dir / "gpu-check.json").write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as tmp:  # model dirs stay outside out_dir (what comes back is small)
        result["torchrun_train"] = torchrun_train(tmp=Path(tmp), **torchrun_args)
    save()
    for T in lengths:
        for loss in ("lightning", "reverse_kl_topk"):
            result["train"].append(_train_steps(train_shape, T, loss, steps, device, vocab, batch,
                                                "bf16" if not cpu_smoke else "fp32"))
            save()
    for T in lengths:
        for loss in ("lightning", "reverse_kl_topk"):
            result["micro_batch_8b"].append(_micro_batch_memory(big_shape, T, loss, device, vocab, 4))
            save()
    result["head_weight_grad"] = bench_head_weight_grad(device=device, **head_args)
    save()
    if not skip_vllm:  # in its own process: its max_memory_allocated is vLLM's, not the trainer's above
        with tempfile.TemporaryDirectory() as tmp:
            args = json.dumps({**vllm_args, "vocab": vocab, "tmp": tmp, "cpu": cpu_smoke})
            subprocess.run([sys.executable, "-m", "pipeline.bench.scale", "vllm", args, str(Path(tmp) / "vllm.json")],
                           check=True)
            result["vllm"] = json.loads((Path(tmp) / "vllm.json").read_text())
        save()
    return result


def main(argv: list[str]) -> None:
    if argv and argv[0] == "case":
        T, loss, path, shape, vocab, out, chunk = argv[1:8]
        run_case(int(T), loss, path, shape, int(vocab), Path(out), int(chunk) or None)
        return
    if argv and argv[0] == "vllm":
        args = json.loads(argv[1])
        rows = _vllm_scoring(**{**args, "tmp": Path(args["tmp"]), "ks": tuple(args["ks"]),
                                "budgets": tuple(args["budgets"])})
        Path(argv[2]).write_text(json.dumps(rows))
        return
    import argparse

    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[2])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-out")),
                        help="directory for gpu-check.json (default: $OUT)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (CI keeps the script working)")
    parser.add_argument("--skip-vllm", action="store_true", help="leave out the vLLM scoring part")
    args = parser.parse_args(argv)
    print(json.dumps(gpu_check(args.out, args.cpu_smoke, args.skip_vllm), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
