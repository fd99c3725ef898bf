#!/usr/bin/env bash
# The trainer and the extraction at the recipe's scale on one GPU, in one command (meant to finish in under 8 minutes
# on an H100/H200-class GPU): random-init Qwen3-shaped models.
#   - the users' code path: `lopd train` under `torchrun --nproc-per-node 1` with FSDP2, bf16, activation
#     checkpointing, ragged rows (1,024-4,096 tokens) and a token budget, a DCP checkpoint at step 2 and a second
#     launch that resumes from it to step 4 (1.7B-shaped student): tokens/s, MFU, peak memory per step;
#   - a 1.7B-shaped student, full optimiser steps at T=4096 and 8192 (lightning, reverse_kl_topk): step time,
#     tokens/s, MFU, max_memory_allocated;
#   - an 8B-shaped student, forward+backward of one 4-sequence micro-batch: activations + loss path (<= 40 GB);
#   - the LM head's weight-gradient accumulation, two-step bf16 product vs fused addmm(out_dtype=fp32);
#   - vLLM scoring of an 8B-shaped teacher, 64 x 6,144 tokens, k = 20 and 128, two token budgets (own process).
# Writes $OUT/gpu-check.json (or --out DIR); model dirs go to $TMPDIR. `--cpu-smoke` runs the same code on tiny
# shapes on CPU, the torchrun part on 2 gloo ranks (CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec "$PY" -m pipeline.bench.scale "$@"
