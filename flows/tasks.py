"""Prefect tasks over the stage functions: one per stage, each a call to ``registry.run_stage`` and nothing more.

Caching: a stage task's cache key hashes the stage name, its validated config (JSON) and the fingerprint of
every input path in it (model dirs: ``model_fingerprint``; shard dirs: their ``manifest.json``; files: sha256).
A cache hit returns the stage's stored result without loading a model. Results are stored as JSON in
``<run_dir>/.prefect/results``. The cache is a shortcut, never the resume mechanism: ``run_stage_task``
recomputes whenever the stage's output directory is missing or empty, and the stage function itself skips
the shards, checkpoints and model dirs that are already complete.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from prefect import Task, flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel

from pipeline.config import (EngineConfig, EvalConfig, RolloutsConfig, RunConfig, SftConfig,
                             TeacherLogprobsConfig, TeacherSftDataConfig, TrainConfig)
from pipeline import demo
from pipeline.fingerprint import model_fingerprint
from pipeline.engines import engine_gpus
from pipeline.stages.common import StageResult
from pipeline.stages.registry import online_train_config, run_stage
from storage.shardset import file_sha256

RESULTS_DIR = ".prefect/results"  # inside run_dir
DATA_STAGES = {"teacher_sft_data", "rollouts", "teacher_logprobs"}  # retried once (a demo step too)


# --- cache keys -------------------------------------------------------------------------------------------


def input_fingerprint(path: Path) -> str | None:
    """Fingerprint of one stage input (model dir, shard dir or file); None when it does not exist yet."""
    if path.is_file():
        return "file-" + file_sha256(path)[:16]
    if (path / "config.json").is_file():
        return model_fingerprint(path)
    if (path / "manifest.json").is_file():
        return "shards-" + file_sha256(path / "manifest.json")[:16]
    return None


def stage_inputs(cfg: BaseModel, prefix: str = "") -> dict[str, Path]:
    """Every path a stage config reads: its path fields except ``out``, nested sections included."""
    paths: dict[str, Path] = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, Path) and name != "out":
            paths[prefix + name] = value
        elif isinstance(value, BaseModel):
            paths.update(stage_inputs(value, prefix=f"{prefix}{name}."))
    return paths


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Hash of task name, stage config and input fingerprints; None (no caching) while an input is missing."""
    cfg: BaseModel = parameters["cfg"]
    fingerprints = {}
    for field, path in stage_inputs(cfg).items():
        fingerprint = input_fingerprint(path)
        if fingerprint is None:
            return None
        fingerprints[field] = fingerprint
    payload = json.dumps({"task": context.task.name, "config": cfg.model_dump(mode="json"), "inputs": fingerprints},
                         sort_keys=True)
    return f"lopd-{context.task.name}-{hashlib.sha256(payload.encode()).hexdigest()[:32]}"


# --- one task per stage -----------------------------------------------------------------------------------

_CACHED: dict[str, Any] = {"cache_key_fn": stage_cache_key, "persist_result": True, "result_serializer": "json"}


@task(name="teacher-sft-data", retries=1, retry_delay_seconds=10, **_CACHED)
def teacher_sft_data(cfg: TeacherSftDataConfig) -> dict[str, Any]:
    """Stage 1: the teacher answers the training prompts into SFT-data shards."""
    return run_stage("teacher_sft_data", cfg, show_progress=False).to_dict()


@task(name="sft", **_CACHED)
def sft(cfg: SftConfig) -> dict[str, Any]:
    """Stage 1b: fine-tune the student on the teacher's answers."""
    return run_stage("sft", cfg, show_progress=False).to_dict()


@task(name="rollouts", retries=1, retry_delay_seconds=10, **_CACHED)
def rollouts(cfg: RolloutsConfig) -> dict[str, Any]:
    """Stage 2: the SFT student samples its rollouts once, into shards."""
    return run_stage("rollouts", cfg, show_progress=False).to_dict()


@task(name="teacher-logprobs", retries=1, retry_delay_seconds=10, **_CACHED)
def teacher_logprobs(cfg: TeacherLogprobsConfig) -> dict[str, Any]:
    """Stage 3: the teacher scores every rollout once, into top-k shards."""
    return run_stage("teacher_logprobs", cfg, show_progress=False).to_dict()


@task(name="train", **_CACHED)
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Stage 4: offline OPD from the top-k shards (resumes from its latest checkpoint)."""
    return run_stage("train", cfg, show_progress=False).to_dict()


@task(name="train-online", **_CACHED)
def train_online(cfg: TrainConfig) -> dict[str, Any]:
    """The online OPD baseline: the student samples and the teacher scores live every step (``<out>_online``)."""
    return run_stage("train", cfg, show_progress=False, online=True).to_dict()


@task(name="eval", **_CACHED)
def eval_(cfg: EvalConfig) -> dict[str, Any]:
    """Held-out accuracy of a model dir (eval.json, eval.md)."""
    return run_stage("eval", cfg, show_progress=False).to_dict()


STAGE_TASKS: dict[str, Task[..., dict[str, Any]]] = {
    "teacher_sft_data": teacher_sft_data, "sft": sft, "rollouts": rollouts,
    "teacher_logprobs": teacher_logprobs, "train": train, "eval": eval_,
}


def _has_output(out: Path) -> bool:
    return out.is_dir() and any(out.iterdir())


def run_stage_task(cfg: RunConfig, name: str, online: bool = False) -> dict[str, Any]:
    """Run one stage's task (``online``: the train stage's online OPD baseline); results live in the run dir,
    and a missing output always means recompute."""
    stage_cfg = cfg.stage(name)
    out = online_train_config(stage_cfg).out if online else stage_cfg.out
    stage_task = (train_online if online else STAGE_TASKS[name]).with_options(
        result_storage=Path(cfg.run_dir).resolve() / RESULTS_DIR, refresh_cache=not _has_output(out))
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
            raise RuntimeError("task runner 'ray' needs prefect-ray: pip install 'lopd[ray]' (or pip install prefect-ray)") from err
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
    parts = spread(cfg.stage(name), name, num_parts, str(Path(cfg.run_dir).resolve() / RESULTS_DIR), runner)
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


# --- artifacts --------------------------------------------------------------------------------------------


@task(cache_policy=NO_CACHE)
def publish_eval_table(eval_dir: Path) -> None:
    """Publish an eval's Markdown table (eval.md) as the ``eval-table`` artifact."""
    create_markdown_artifact(markdown=(eval_dir / "eval.md").read_text(), key="eval-table",
                             description=f"greedy accuracy on held-out prompts ({eval_dir})")


@task(cache_policy=NO_CACHE)
def publish_report(markdown_file: Path) -> None:
    """Publish a run report (e.g. demo.md: accuracy table, time to accuracy) as the ``lopd-report`` artifact."""
    create_markdown_artifact(markdown=markdown_file.read_text(), key="lopd-report", description=str(markdown_file))


@task(cache_policy=NO_CACHE)
def publish_plots(plots: dict[str, str]) -> None:
    """Publish the paths of a run's plots (PNG files on the machine that ran the flow) as the ``plots`` artifact."""
    rows = [f"| {name} | [{Path(p).name}]({Path(p).resolve().as_uri()}) | `{Path(p).resolve()}` |"
            for name, p in plots.items()]
    create_markdown_artifact(markdown="\n".join(["| plot | link | path |", "|---|---|---|", *rows]) + "\n",
                             key="plots", description="plots written by this flow run")
