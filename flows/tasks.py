"""Prefect tasks over the stage functions: one per stage, each a call to ``registry.run_stage`` and nothing more;
the task runners that spread a stage's shards over workers; the demo's steps as tasks.

Stage tasks are cached (``flows.caching``); the demo's steps are not (each skips the work it finds complete).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from prefect import Task, flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel

from flows.artifacts import publish_eval_table, publish_plots
from flows.caching import CACHED, refresh, result_storage
from pipeline.config import (
    EngineConfig,
    EvalConfig,
    RolloutsConfig,
    RunConfig,
    SftConfig,
    TeacherLogprobsConfig,
    TeacherSftDataConfig,
    TrainConfig,
)
from pipeline.demo import experiment as demo
from pipeline.engines import engine_gpus
from pipeline.stages.common import StageResult
from pipeline.stages.registry import online_train_config, run_stage

DATA_STAGES = {"teacher_sft_data", "rollouts", "teacher_logprobs"}  # retried once (a demo step too)


# --- one task per stage -----------------------------------------------------------------------------------


@task(name="teacher-sft-data", retries=1, retry_delay_seconds=10, **CACHED)
def teacher_sft_data(cfg: TeacherSftDataConfig) -> dict[str, Any]:
    """Stage 1: the teacher answers the training prompts into SFT-data shards."""
    return run_stage("teacher_sft_data", cfg, show_progress=False).to_dict()


@task(name="sft", **CACHED)
def sft(cfg: SftConfig) -> dict[str, Any]:
    """Stage 1b: fine-tune the student on the teacher's answers."""
    return run_stage("sft", cfg, show_progress=False).to_dict()


@task(name="rollouts", retries=1, retry_delay_seconds=10, **CACHED)
def rollouts(cfg: RolloutsConfig) -> dict[str, Any]:
    """Stage 2: the SFT student samples its rollouts once, into shards."""
    return run_stage("rollouts", cfg, show_progress=False).to_dict()


@task(name="teacher-logprobs", retries=1, retry_delay_seconds=10, **CACHED)
def teacher_logprobs(cfg: TeacherLogprobsConfig) -> dict[str, Any]:
    """Stage 3: the teacher scores every rollout once, into top-k shards."""
    return run_stage("teacher_logprobs", cfg, show_progress=False).to_dict()


@task(name="train", **CACHED)
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Stage 4: offline OPD from the top-k shards (resumes from its latest checkpoint)."""
    return run_stage("train", cfg, show_progress=False).to_dict()


@task(name="train-online", **CACHED)
def train_online(cfg: TrainConfig) -> dict[str, Any]:
    """The online OPD baseline: the student samples and the teacher scores live every step (``<out>_online``)."""
    return run_stage("train", cfg, show_progress=False, online=True).to_dict()


@task(name="eval", **CACHED)
def eval_(cfg: EvalConfig) -> dict[str, Any]:
    """Held-out accuracy of a model dir (eval.json, eval.md)."""
    return run_stage("eval", cfg, show_progress=False).to_dict()


STAGE_TASKS: dict[str, Task[..., dict[str, Any]]] = {
    "teacher_sft_data": teacher_sft_data, "sft": sft, "rollouts": rollouts,
    "teacher_logprobs": teacher_logprobs, "train": train, "eval": eval_,
}


def run_stage_task(cfg: RunConfig, name: str, online: bool = False) -> dict[str, Any]:
    """Run one stage's task (``online``: the train stage's online OPD baseline); results live in the run dir,
    and a missing output always means recompute."""
    stage_cfg = cfg.stage(name)
    out = online_train_config(stage_cfg).out if online else stage_cfg.out
    stage_task = (train_online if online else STAGE_TASKS[name]).with_options(
        result_storage=result_storage(cfg.run_dir), refresh_cache=refresh(out))
    result = stage_task(stage_cfg)
    if name == "eval":
        publish_eval_table(Path(result["out"]))
    if name == "train" and (Path(result["out"]) / "curves.png").exists():
        publish_plots({"training curves": str(Path(result["out"]) / "curves.png")})
    return result


TASK_RUNNERS = ("threads", "dask", "ray")


def make_task_runner(kind: str, num_parts: int, address: str | None = None) -> TaskRunner:
    """The task runner that spreads a stage's parts: Prefect's thread pool, or a Dask / Ray cluster.

    ``address`` joins an existing cluster (``tcp://scheduler:8786``, ``ray://head:10001``); without it Dask starts
    a local cluster of ``num_parts`` single-threaded worker processes and Ray a local instance.
    """
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=num_parts)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as err:
            raise RuntimeError("task runner 'dask' needs prefect-dask: pip install 'lopd[dask]'") from err
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": num_parts, "threads_per_worker": 1, "processes": True})
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as err:
            raise RuntimeError("task runner 'ray' needs prefect-ray: pip install 'lopd[ray]' "
                               "(or pip install prefect-ray)") from err
        return RayTaskRunner(address=address) if address else RayTaskRunner()
    raise ValueError(f"unknown task runner {kind!r}: choose one of {', '.join(TASK_RUNNERS)}")


def part_remote_options(engine: EngineConfig, cluster_gpus: float) -> dict[str, Any]:
    """Ray resources of one shard-part task: on a cluster with GPUs, the GPUs its engine occupies (vLLM: tensor x
    data parallel size; hf: one), so Ray places each engine group on free GPUs; none on a CPU-only cluster."""
    return {"num_gpus": engine_gpus(engine) if cluster_gpus > 0 else 0}


def _part_options(runner: str, engine: EngineConfig) -> AbstractContextManager:
    if runner != "ray":
        return nullcontext()
    import ray
    from prefect_ray.context import remote_options

    return remote_options(**part_remote_options(engine, ray.cluster_resources().get("GPU", 0)))


@flow(name="shard-parts")
def shard_parts_flow(stage_cfg: BaseModel, name: str, num_parts: int, results_dir: str,
                     runner: str = "threads") -> list[dict[str, Any]]:
    """One stage task per part on this flow's task runner (set by ``run_stage_parts``); on Ray each part declares
    the GPUs its engine needs (``part_remote_options``)."""
    stage_task = STAGE_TASKS[name].with_options(result_storage=Path(results_dir))
    with _part_options(runner, stage_cfg.engine):
        futures = [stage_task.submit(stage_cfg.model_copy(update={"num_parts": num_parts, "part": part}))
                   for part in range(num_parts)]
    return [f.result() for f in futures]


def run_stage_parts(cfg: RunConfig, name: str, num_parts: int, runner: str = "threads",
                    address: str | None = None) -> dict[str, Any]:
    """Spread a shard-writing stage over ``num_parts`` concurrent tasks (shard i goes to part i % num_parts) on
    ``runner`` (see ``make_task_runner``). A last pass with one part then finds every shard complete and writes
    the final manifest."""
    if num_parts == 1:
        return run_stage_task(cfg, name)
    spread = shard_parts_flow.with_options(task_runner=make_task_runner(runner, num_parts, address),
                                           flow_run_name=f"{name}-x{num_parts}-{runner}")
    parts = spread(cfg.stage(name), name, num_parts, str(result_storage(cfg.run_dir)), runner)
    final = STAGE_TASKS[name].with_options(cache_policy=NO_CACHE)(cfg.stage(name))
    return {**final, "parts": parts}


# --- the demo's steps as tasks ----------------------------------------------------------------------------
# Not cached by Prefect: every demo step skips the work it finds complete on disk.


@task(name="world", cache_policy=NO_CACHE)
def demo_world(cfg: RunConfig) -> dict[str, Any]:
    """The demo world: prompt files, models, the two bootstrapped teachers (reused when complete)."""
    return demo.demo_world(cfg, show_progress=False)


@task(cache_policy=NO_CACHE, retry_delay_seconds=10)
def _demo_step(plan: demo.DemoPlan, name: str) -> StageResult:
    return demo.run_demo_step(plan, name, show_progress=False)


def demo_step(plan: demo.DemoPlan, name: str) -> StageResult:
    """Step ``name`` of the demo's plan as a task named after the step; data stages are retried once."""
    retries = 1 if plan.steps[name].stage in DATA_STAGES else 0
    return _demo_step.with_options(name=name, retries=retries)(plan, name)


@task(name="report", cache_policy=NO_CACHE)
def demo_report(plan: demo.DemoPlan, world: dict[str, Any], results: dict[str, StageResult],
                started: float) -> dict[str, Any]:
    """The demo's report: accuracies, time to accuracy, plots (demo.json, demo.md)."""
    return demo.demo_report(plan, world, results, started)
