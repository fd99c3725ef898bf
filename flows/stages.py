"""One flow per stage, and ``lightning-opd``: every stage of a run config in order (or the demo).

Every flow takes the same parameters as the CLI: a run YAML (``config_path``), ``section.field=value``
overrides and an optional ``run_dir``. Relative paths resolve against the working directory of the process
that runs the flow (for a deployment: where ``lopd serve`` was started). The shard-writing stages also take
``num_parts`` (concurrent tasks, one per part of the shards), ``runner`` (``threads``, ``dask`` or ``ray``) and
``address`` (an existing Dask/Ray cluster; without it a local one is started).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from prefect import flow

from flows.artifacts import publish_plots, publish_report
from flows.tasks import demo_report, demo_step, demo_world, run_stage_parts, run_stage_task
from pipeline.config import STAGES, load_run_config
from pipeline.demo.experiment import demo_plan

Runner = Literal["threads", "dask", "ray"]  # see flows.tasks.make_task_runner


@flow(name="teacher-sft-data")
def teacher_sft_data_flow(config_path: str, overrides: list[str] | None = None,
                          run_dir: str | None = None, num_parts: int = 1, runner: Runner = "threads",
                          address: str | None = None) -> dict[str, Any]:
    """Stage 1: the teacher answers the training prompts into SFT-data shards."""
    cfg = load_run_config(config_path, overrides, run_dir)
    return run_stage_parts(cfg, "teacher_sft_data", num_parts, runner, address)


@flow(name="sft")
def sft_flow(config_path: str, overrides: list[str] | None = None, run_dir: str | None = None) -> dict[str, Any]:
    """Stage 1b: fine-tune the student on the teacher's answers."""
    return run_stage_task(load_run_config(config_path, overrides, run_dir), "sft")


@flow(name="rollouts")
def rollouts_flow(config_path: str, overrides: list[str] | None = None, run_dir: str | None = None,
                  num_parts: int = 1, runner: Runner = "threads", address: str | None = None) -> dict[str, Any]:
    """Stage 2: the SFT student samples its rollouts once, into shards."""
    return run_stage_parts(load_run_config(config_path, overrides, run_dir), "rollouts", num_parts, runner, address)


@flow(name="teacher-logprobs")
def teacher_logprobs_flow(config_path: str, overrides: list[str] | None = None,
                          run_dir: str | None = None, num_parts: int = 1, runner: Runner = "threads",
                          address: str | None = None) -> dict[str, Any]:
    """Stage 3: the teacher scores every rollout once, into top-k shards."""
    cfg = load_run_config(config_path, overrides, run_dir)
    return run_stage_parts(cfg, "teacher_logprobs", num_parts, runner, address)


@flow(name="train")
def train_flow(config_path: str, overrides: list[str] | None = None, run_dir: str | None = None,
               online: bool = False) -> dict[str, Any]:
    """Stage 4: offline OPD from the top-k shards; ``online=True``: the online OPD baseline (live teacher)."""
    return run_stage_task(load_run_config(config_path, overrides, run_dir), "train", online=online)


@flow(name="eval")
def eval_flow(config_path: str, overrides: list[str] | None = None, run_dir: str | None = None) -> dict[str, Any]:
    """Held-out accuracy of the configured model dir."""
    return run_stage_task(load_run_config(config_path, overrides, run_dir), "eval")


@flow(name="lightning-opd")
def lightning_opd(config_path: str, overrides: list[str] | None = None, run_dir: str | None = None,
                  demo: bool = False) -> dict[str, Any]:
    """Every stage of the run config in order; with demo=True the whole demo (world, ablations, report)."""
    cfg = load_run_config(config_path, overrides, run_dir)
    if not demo:
        return {name: run_stage_task(cfg, name) for name in STAGES if name in cfg.sections}
    started = time.perf_counter()
    world = demo_world(cfg)
    plan = demo_plan(cfg, world)  # every stage run of the demo, in order: offline OPD, ablations, controls, evals
    results = {name: demo_step(plan, name) for name in plan.steps}
    report = demo_report(plan, world, results, started)
    publish_report(plan.run_dir / "demo.md")
    publish_plots(report["plots"])
    return report


STAGE_FLOWS = {
    "teacher_sft_data": teacher_sft_data_flow, "sft": sft_flow, "rollouts": rollouts_flow,
    "teacher_logprobs": teacher_logprobs_flow, "train": train_flow, "eval": eval_flow,
}
