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


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """The tiny teacher after a short bootstrap on correct 2-digit solutions: a peaked, non-uniform teacher
    (a random-init teacher is near uniform, so distillation losses against it are ~0)."""
    from pipeline.config import DemoConfig, OptimConfig
    from pipeline.demo import ground_truth_examples
    from pipeline.models import load_model, load_tokenizer
    from pipeline.training import save_hf_model, seed_everything, sft_train

    seed_everything(0)
    tok = load_tokenizer(tiny_models["teacher"])
    model = load_model(tiny_models["teacher"])
    sft_train(model, ground_truth_examples(tok, DemoConfig(digits=2), "A", set(), seed=0), steps=60,
              batch_size=32, optim=OptimConfig(lr=3e-3), pad_id=tok.pad_token_id, show_progress=False)
    out = tmp_path_factory.mktemp("trained") / "teacher"
    save_hf_model(model, tok, out)
    return {"teacher": out, "student": tiny_models["student"]}
