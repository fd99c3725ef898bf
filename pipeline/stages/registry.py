"""Stage name -> stage function. The CLI, `lopd run` and the Prefect flows all dispatch through here."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from pipeline.stages.common import StageResult

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


def run_stage(name: str, cfg: Any, show_progress: bool = True, online: bool = False) -> StageResult:
    if name == "train" and not online and cfg.online is not None:
        cfg = cfg.model_copy(update={"online": None})
    elif name == "train" and online:
        # the online baseline never shares checkpoints with the offline run
        cfg = cfg.model_copy(update={"out": cfg.out.with_name(cfg.out.name + "_online")})
    return stage_function(name)(cfg, show_progress=show_progress)
