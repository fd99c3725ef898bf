#!/usr/bin/env bash
# The trainer and the extraction at the recipe's scale on one GPU, in one command (under 8 minutes on an
# H100/H200-class GPU): random-init Qwen3-shaped models, bf16 + activation checkpointing.
#   - a 1.7B-shaped student, full optimiser steps at T=4096 and 8192 (lightning, reverse_kl_topk): step time,
#     tokens/s, MFU, max_memory_allocated;
#   - an 8B-shaped student, forward+backward of one 4-sequence micro-batch: activations + loss path (<= 40 GB);
#   - vLLM scoring of an 8B-shaped teacher, 64 x 6,144 tokens, k = 20 and 128, two token budgets.
# Writes $OUT/gpu-check.json (or --out DIR). `--cpu-smoke` runs the same code on tiny shapes on CPU (CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec "$PY" -m pipeline.bench.scale "$@"
