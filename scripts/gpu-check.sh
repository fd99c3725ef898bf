#!/usr/bin/env bash
# lopd's scale figures on one lent GPU, one part per command (each meant to finish well under 8 minutes on an H100;
# the arithmetic behind each estimate is in pipeline/bench/gpu_check.py and docs/benchmarks.md):
#   bash scripts/gpu-check.sh --part train    # lopd train under torchrun (FSDP2, token budget, DCP resume); 1.7B steps
#   bash scripts/gpu-check.sh --part head     # 8B micro-batch memory; the head's weight gradient, two-step vs fused
#   bash scripts/gpu-check.sh --part score    # vLLM scoring of an 8B-shaped teacher (needs vLLM)
#   bash scripts/gpu-check.sh --part parity   # VLLMEngine vs HFEngine, V2 model runner on and off (needs vLLM)
#   bash scripts/gpu-check.sh --cpu-smoke     # every part on tiny shapes on CPU (CI)
# Each part writes $OUT/gpu-check-<part>.json (or --out DIR) after every case; model dirs and checkpoints go to
# $TMPDIR, after a free-space check. Without the project's .venv (a bare device image), the packages the image lacks
# are installed offline from the wheelhouse scripts/device-wheels.sh builds (LOPD_WHEELS, default .device-wheels)
# into a directory on PYTHONPATH (LOPD_DEVICE_SITE, default $TMPDIR/lopd-device-site).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# import name -> distribution, for every package the check imports beyond torch, transformers and numpy
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"pydantic": "pydantic>=2.7", "pyarrow": "pyarrow>=17", "yaml": "pyyaml", "typer": "typer>=0.12",
        "rich": "rich>=13"}
print(" ".join(dist for mod, dist in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  WHEELS=${LOPD_WHEELS:-.device-wheels}
  SITE=${LOPD_DEVICE_SITE:-${TMPDIR:-/tmp}/lopd-device-site}
  if [ ! -d "$WHEELS" ]; then
    echo "gpu-check: this Python lacks $missing and there is no wheelhouse at $WHEELS (bash scripts/device-wheels.sh)" >&2
    exit 2
  fi
  echo "gpu-check: installing $missing from $WHEELS into $SITE (offline)" >&2
  # shellcheck disable=SC2086
  "$PY" -m pip install --quiet --no-warn-conflicts --no-index --find-links "$WHEELS" --target "$SITE" --upgrade $missing
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
exec "$PY" -m pipeline.bench.gpu_check "$@"
