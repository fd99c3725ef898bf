"""Inference engines (see docs/engines.md): ``make_engine`` builds the configured one.

Every engine is a context manager: leaving the ``with`` block, on an error too, frees the model and stops
the engine's worker processes (vLLM's engine core, data-parallel ranks)::

    with make_engine(model_dir, cfg.engine) as engine:
        scored = engine.score(sequences, starts, k)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config import EngineConfig

if TYPE_CHECKING:
    from pipeline.engines.base import Engine


def make_engine(model_dir: str, cfg: EngineConfig, seed: int = 0, max_logprobs: int = 20) -> Engine:
    """Build the configured engine for a model directory (``max_logprobs``: the largest k vLLM will score)."""
    if cfg.name == "hf":
        from pipeline.engines.hf import HFEngine

        return HFEngine(model_dir, cfg)
    from pipeline.engines.vllm_engine import VLLMEngine

    return VLLMEngine(model_dir, cfg, seed=seed, max_logprobs=max_logprobs)


def engine_gpus(cfg: EngineConfig) -> int:
    """GPUs one worker of the configured engine occupies on a GPU machine: vLLM runs ``data_parallel_size``
    groups of ``tensor_parallel_size`` GPUs each; the hf engine one GPU."""
    return cfg.tensor_parallel_size * cfg.data_parallel_size if cfg.name == "vllm" else 1
