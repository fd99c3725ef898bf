"""Benchmarks of the trainer at the recipe's scale (JSON; never run as timed tests).

``bench_train_memory`` (``lopd bench train-memory --json``): one forward+backward step of a random-init
Qwen3-shaped student (vocab 151,936) per (sequence length, loss), through the old full-logit path (the Hugging Face
forward's B x T x V logits, upcast to fp32, losses on them), through the chunked LM head, and through the chunked
head with activation checkpointing (``_ckpt``: how the trainer runs at scale). Each case runs in its
own process, so its peak memory is its own: peak RSS during the step minus RSS before it (on CPU), or
``max_memory_allocated`` minus memory before the step (on a GPU). Loss and gradients of the two paths are compared
(gradients on every decoder parameter, and on 4,096 sampled rows of the LM head).

The GPU check (``scripts/gpu-check.sh``) is ``pipeline.bench.gpu_check``; it builds on the shapes and records here.
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
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       intermediate_size=3072, tie_word_embeddings=True),
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
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in ``dtype`` on ``device``: no fp32 or host copy
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
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
    The fused kernel exists on CUDA only (and only in a torch that has ``out_dtype``): elsewhere only the two-step
    form is measured."""
    from pipeline.train.head import accumulate_weight_grad, default_chunk_tokens, fused_addmm_supported

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    chunk = chunk_tokens or default_chunk_tokens(vocab)
    gen = torch.Generator(device=dev).manual_seed(0)
    g_N_V = (torch.randn(tokens, vocab, device=dev, generator=gen) * 1e-3).to(torch.bfloat16)
    h_N_H = torch.randn(tokens, hidden, device=dev, generator=gen).to(torch.bfloat16)
    out: dict[str, Any] = {"vocab": vocab, "hidden": hidden, "tokens": tokens, "chunk_tokens": chunk,
                           "device": str(dev)}
    grads = {}
    for fused in ([False, True] if fused_addmm_supported(dev) else [False]):
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


def main(argv: list[str]) -> None:
    T, loss, path, shape, vocab, out, chunk = argv[1:8]  # argv[0] == "case": one case of bench_train_memory
    run_case(int(T), loss, path, shape, int(vocab), Path(out), int(chunk) or None)


if __name__ == "__main__":
    main(sys.argv[1:])
