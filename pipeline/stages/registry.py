"""Stage name -> stage function. The CLI, `lopd run` and the Prefect flows all dispatch through here."""

from __future__ import annotations

from typing import Any, Callable

from pipeline.stages.common import StageResult


def _functions() -> dict[str, Callable[..., StageResult]]:
    from pipeline.stages.evaluate import run_eval
    from pipeline.stages.sampling import run_rollouts, run_teacher_sft_data
    from pipeline.stages.sft import run_sft
    from pipeline.stages.teacher_logprobs import run_teacher_logprobs
    from pipeline.stages.train import run_train

    return {"teacher_sft_data": run_teacher_sft_data, "sft": run_sft, "rollouts": run_rollouts,
            "teacher_logprobs": run_teacher_logprobs, "train": run_train, "eval": run_eval}


def run_stage(name: str, cfg: Any, show_progress: bool = True, online: bool = False) -> StageResult:
    if name == "train" and not online and cfg.online is not None:
        cfg = cfg.model_copy(update={"online": None})
    elif name == "train" and online:
        # the online baseline never shares checkpoints with the offline run
        cfg = cfg.model_copy(update={"out": cfg.out.with_name(cfg.out.name + "_online")})
    return _functions()[name](cfg, show_progress=show_progress)
