"""One training stage of a run config under ``torchrun``, optionally cut short, for the kill-and-resume tests.

usage: python -m tests.scale_helpers.stage_worker {train|sft} RUN_YAML STOP [section.field=value ...]

``train`` stops after STOP steps (``run_train``'s ``stop_after``: the process ends between steps, as a kill
would); ``sft`` crashes inside step STOP (its loss raises). STOP 0 runs to the end.
"""

from __future__ import annotations

import logging
import sys

from pipeline.config import load_run_config
from pipeline.stages.registry import run_stage
from pipeline.stages.train import run_train
from pipeline.train import distributed, losses


def main(stage: str, run_yaml: str, stop: int, overrides: list[str]) -> None:
    try:
        run(stage, run_yaml, stop, overrides)
    finally:  # as the CLI does: leave the process group before the interpreter shuts down
        distributed.leave_distributed()


def run(stage: str, run_yaml: str, stop: int, overrides: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_run_config(run_yaml, overrides).stage(stage)
    if stage == "train":
        run_train(cfg, show_progress=False, stop_after=stop or None)
        return
    if stop:  # one micro-batch and one head chunk per step on the tiny models: the n-th loss call is step n
        real_loss, calls = losses.sft_cross_entropy, [0]

        def crash_at_step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == stop:
                raise SystemExit(f"simulated crash in step {stop}")
            return real_loss(*args, **kwargs)

        losses.sft_cross_entropy = crash_at_step
    run_stage(stage, cfg, show_progress=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
