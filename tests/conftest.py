"""Shared fixtures: tiny models the project creates itself (no hub), caches kept inside a temp dir."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_CACHE = Path(tempfile.gettempdir()) / "lopd-test-cache"
for var, sub in (("VLLM_CACHE_ROOT", "vllm"), ("HF_HOME", "hf"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
    os.environ.setdefault(var, str(_CACHE / sub))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Untrained demo-world teacher and student directories (random weights, real HF format)."""
    from pipeline.demo_world import ModelShape, make_models

    out = tmp_path_factory.mktemp("models")
    return make_models(
        out,
        teacher=ModelShape(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128),
        student=ModelShape(hidden_size=32, num_layers=1, num_heads=1, intermediate_size=64),
        seed=0,
    )
