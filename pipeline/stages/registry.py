"""Stage name -> stage function. The CLI, `lopd run` and the Prefect flows all dispatch through here."""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

from pipeline.stages.common import StageResult, write_stage_config

# Imported on use, so that e.g. `lopd rollouts` does not load the trainer.
STAGE_FUNCTIONS: dict[str, str] = {
    "teacher_sft_data": "pipeline.stages.sampling:run_teacher_sft_data",
    "sft": "pipeline.stages.sft:run_sft",
    "rollouts": "pipeline.stages.sampling:run_rollouts",
    "teacher_logprobs": "pipeline.stages.teacher_logprobs:run_teacher_logprobs",
    "train": "pipeline.stages.train:run_train",
    "eval": "pipeline.stages.evaluate:run_eval",
}


def stage_function(name: str) -> Callable[..., StageResult]:
    module, func = STAGE_FUNCTIONS[name].split(":")
    return getattr(importlib.import_module(module), func)


def online_train_config(cfg: Any) -> Any:
    """The online OPD baseline's train config: needs a ``train.online`` section, and writes to ``<out>_online``
    so that it never shares checkpoints with the offline run."""
    if cfg.online is None:
        raise ValueError("online OPD needs a train.online section (teacher, prompts) in the run config")
    return cfg.model_copy(update={"out": cfg.out.with_name(cfg.out.name + "_online")})


def run_stage(name: str, cfg: Any, show_progress: bool = True, online: bool = False) -> StageResult:
    """Run stage ``name``; ``online=True`` (train only) runs the online OPD baseline instead of offline OPD. A
    stage that completes records the resolved config it ran with beside its output (``common.write_stage_config``;
    the main process only, under torchrun)."""
    if name == "train" and online:
        from pipeline.stages.train import run_online_train

        cfg = online_train_config(cfg)
        result = run_online_train(cfg, show_progress=show_progress)
    else:
        result = stage_function(name)(cfg, show_progress=show_progress)
    if int(os.environ.get("RANK", "0")) == 0 and "stopped_at" not in result.summary:
        write_stage_config(name, cfg)
    return result
