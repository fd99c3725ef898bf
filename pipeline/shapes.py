"""``ModelShape``, the size of a demo-world Llama: a config value (pydantic only), so that ``pipeline.config``
holds one without importing transformers; ``pipeline.demo.world`` builds the models."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ModelShape(BaseModel):
    """Size of a demo Llama. head_dim is explicit: vLLM's CPU attention needs one of its supported sizes."""

    model_config = ConfigDict(extra="forbid")
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 256
    max_position_embeddings: int = 96
