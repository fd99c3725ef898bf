"""The GPU machine's software rehearsed on CPU: scripts/device-rehearsal.sh builds a second environment with what
the device image has (Python 3.12, torch 2.11, transformers 5.17, numpy; no pydantic, pyarrow, vLLM, prefect...),
adds only the wheelhouse scripts/device-wheels.sh carries (installed offline by gpu-check.sh), and runs
`gpu-check.sh --cpu-smoke`: a missing import or an API that differs between those versions and the project's .venv
fails here, not on the device. The environment is kept between runs (LOPD_REHEARSAL_ENV) while its pins hold."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.test_gpu_check import REPO, check_train_and_head

pytestmark = pytest.mark.integration


def test_gpu_check_runs_on_the_device_software(tmp_path):
    res = subprocess.run(["bash", "scripts/device-rehearsal.sh", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_train_and_head(tmp_path)
    summary = json.loads((tmp_path / "rehearsal.json").read_text())
    print(f"\ndevice rehearsal: environment {summary['env_seconds']} s, wheelhouse {summary['wheelhouse_seconds']} s, "
          f"smoke {summary['smoke_seconds']} s")
    for name in ("train", "head"):
        assert summary[name]["torch"].startswith("2.11.0") and summary[name]["transformers"].startswith("5.17.")
    assert "vLLM is not installed" in summary["score"]["skipped"][0]  # as on the device image
    assert {"pydantic", "pydantic_core", "pyarrow"} <= set(summary["from_wheelhouse"])  # the image lacks them
