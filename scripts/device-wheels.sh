#!/usr/bin/env bash
# The wheelhouse scripts/gpu-check.sh installs from, offline, on a GPU machine that reaches no package registry.
#   bash scripts/device-wheels.sh [DIR]          # default DIR: .device-wheels (git-ignored; carry it to the device)
# Its contents: the packages the GPU check imports beyond torch, transformers and numpy (which the device image has:
# Python 3.12, torch 2.11.0+cu130, transformers 5.17), with their dependencies, as binary wheels for the device's
# Python and platform. The check's import path needs no prefect, polars, zstandard, vllm or math-verify (tested in
# tests/test_device_rehearsal.py); pyarrow is most of the bytes. Fails if the wheelhouse exceeds 64 MiB.
# DEVICE_PYTHON_VERSION (default 3.12) and DEVICE_PLATFORMS (glibc 2.28 and older manylinux tags) select the target.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.device-wheels}
PYVER=${DEVICE_PYTHON_VERSION:-3.12}
PLATFORMS=${DEVICE_PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64}
PIP=${PIP:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LIMIT_MIB=64
# What the check imports (pipeline.bench.gpu_check, lopd.cli train, pipeline.config, storage) outside the image.
# Version floors as in pyproject.toml (pip would otherwise settle for pydantic 1 where no pydantic-core wheel fits).
PACKAGES=("pydantic>=2.7" "pyarrow>=17" pyyaml "typer>=0.12" "rich>=13")
platform_args=()
for p in $PLATFORMS; do platform_args+=(--platform "$p"); done
rm -rf "$DIR" && mkdir -p "$DIR"
# the image's own packages are not downloaded again (nor torch's CUDA wheels): constraints keep pip's resolver
# away from anything that would pull them in
"$PIP" -m pip download --quiet --dest "$DIR" --only-binary=:all: --python-version "$PYVER" "${platform_args[@]}" \
  --implementation cp "${PACKAGES[@]}" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
for heavy in torch numpy transformers nvidia; do
  if ls "$DIR" | grep -qi "^$heavy"; then
    echo "device-wheels: $heavy was pulled in as a dependency; the device image has it" >&2
    exit 1
  fi
done
size_kib=$(du -sk "$DIR" | cut -f1)
echo "device-wheels: $(ls "$DIR" | wc -l) wheels, $((size_kib / 1024)) MiB in $DIR (python $PYVER)"
ls "$DIR"
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
  echo "device-wheels: over the ${LIMIT_MIB} MiB a device call may carry" >&2
  exit 1
fi
