"""Prefect layer: cache keys and task logic (.fn), stage flows in-process (prefect_test_harness), and a real
deployment run against a local Prefect server (integration)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pyarrow as pa
import pytest

from flows import caching, stages, tasks
from pipeline.config import TrainConfig, load_run_config
from pipeline.fingerprint import model_fingerprint
from storage.shardset import ShardSet
from tests.conftest import free_port, rollouts_in_parts_equal_one_process, write_prompts, write_run_config
from tests.train.helpers import two_sources


@pytest.fixture()
def eval_config(tmp_path, tiny_models) -> Path:
    prompts = write_prompts(tmp_path / "test.jsonl")
    return write_run_config(tmp_path, {"eval": {"model": str(tiny_models["student"]), "prompts": str(prompts),
                                                "max_new_tokens": 8}})


def task_context(name: str) -> SimpleNamespace:
    return SimpleNamespace(task=SimpleNamespace(name=name))


# --- cache keys and task logic, no Prefect engine ---------------------------------------------------------


def test_stage_inputs_are_every_path_but_out(tmp_path):
    cfg = load_run_config(write_run_config(tmp_path, {"train": {
        "online": {"teacher": "/t", "prompts": "/p.jsonl"}}})).stage("train")
    assert caching.stage_inputs(cfg) == {"student": tmp_path / "run/sft_student",
                                       "shards": tmp_path / "run/teacher_topk",
                                       "online.teacher": Path("/t"), "online.prompts": Path("/p.jsonl")}


def test_prefect_cache_key_reads_every_listed_source(tmp_path):
    """The stage tasks' cache key fingerprints each listed shard set (a changed source is a new key)."""
    from flows.caching import stage_inputs

    cfg = TrainConfig(student="s", shards=two_sources(tmp_path), out="o")
    inputs = stage_inputs(cfg)
    assert inputs["shards.0.path"] == tmp_path / "a" and inputs["shards.1.path"] == tmp_path / "b"


def test_input_fingerprints(tmp_path, tiny_models):
    prompts = write_prompts(tmp_path / "p.jsonl")
    assert caching.input_fingerprint(tiny_models["teacher"]) == model_fingerprint(tiny_models["teacher"])
    assert caching.input_fingerprint(prompts).startswith("file-")
    assert caching.input_fingerprint(tmp_path / "missing") is None

    shards = ShardSet.create(tmp_path / "shards", kind="samples", metadata={"role": "test"})
    shards.write_shard(0, pa.table({"x": [1, 2]}))
    shards.finalize(expected_shards=1)
    before = caching.input_fingerprint(tmp_path / "shards")
    assert before.startswith("shards-")
    shards.write_shard(1, pa.table({"x": [3]}))
    shards.finalize(expected_shards=2)
    assert caching.input_fingerprint(tmp_path / "shards") != before


def test_cache_key_follows_config_and_input_contents(tmp_path, eval_config):
    cfg = load_run_config(eval_config).stage("eval")
    key = caching.stage_cache_key(task_context("eval"), {"cfg": cfg})
    assert key == caching.stage_cache_key(task_context("eval"), {"cfg": cfg.model_copy()})
    assert key != caching.stage_cache_key(task_context("eval"), {"cfg": cfg.model_copy(update={"max_new_tokens": 9})})
    assert key != caching.stage_cache_key(task_context("sft"), {"cfg": cfg})
    with cfg.prompts.open("a") as f:  # same path, new contents
        f.write(json.dumps({"id": "extra", "prompt": "1+1=", "answer": "2"}) + "\n")
    assert key != caching.stage_cache_key(task_context("eval"), {"cfg": cfg})
    missing = cfg.model_copy(update={"model": tmp_path / "not-trained-yet"})
    assert caching.stage_cache_key(task_context("eval"), {"cfg": missing}) is None


def test_eval_task_logic(eval_config):
    cfg = load_run_config(eval_config).stage("eval")
    result = tasks.eval_.fn(cfg)
    written = json.loads((cfg.out / "eval.json").read_text())
    assert result["stage"] == "eval" and result["out"] == str(cfg.out)
    assert result["pass@1"] == written["pass@1"] and written["greedy"]["samples"] == 6


# --- flows in-process against a temporary Prefect API -----------------------------------------------------


def test_eval_flow_caches_and_recomputes_a_missing_output(prefect_api, eval_config):
    run_dir = load_run_config(eval_config).run_dir
    eval_json = run_dir / "eval" / "eval.json"
    first = stages.eval_flow(config_path=str(eval_config))
    assert first["pass@1"] == json.loads(eval_json.read_text())["pass@1"]
    assert len(list((run_dir / caching.RESULTS_DIR).iterdir())) == 1  # the JSON result, kept in the run dir
    written_at = eval_json.stat().st_mtime_ns

    assert stages.eval_flow(config_path=str(eval_config)) == first  # cache hit: the stage did not run
    assert eval_json.stat().st_mtime_ns == written_at

    shutil.rmtree(run_dir / "eval")  # output gone: the cache must not hide it
    assert stages.eval_flow(config_path=str(eval_config))["pass@1"] == first["pass@1"]
    assert eval_json.exists()

    changed = stages.eval_flow(config_path=str(eval_config), overrides=["eval.limit=3"])  # new key: runs again
    assert json.loads(eval_json.read_text())["greedy"]["samples"] == 3 and changed["pass@1"] is not None


def test_lightning_opd_flow_runs_every_stage_in_order(prefect_api, tmp_path, tiny_models):
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=8)
    engine = {"batch_size": 64}
    sampling = {"n": 1, "max_new_tokens": 8, "temperature": 1.0}
    config = write_run_config(tmp_path, {
        "teacher_sft_data": {"prompts": str(prompts), "teacher": str(tiny_models["teacher"]), "sampling": sampling,
                             "engine": engine, "prompts_per_shard": 4},
        "sft": {"student": str(tiny_models["student"]), "steps": 2, "batch_size": 4, "log_every": 1},
        "rollouts": {"prompts": str(prompts), "sampling": {**sampling, "n": 2}, "engine": engine,
                     "prompts_per_shard": 4},
        "teacher_logprobs": {"teacher": str(tiny_models["teacher"]), "k": 4, "engine": engine},
        "train": {"steps": 2, "batch_size": 4, "checkpoint_every": 1, "log_every": 1, "shuffle_buffer": 8},
        "eval": {"prompts": str(prompts), "max_new_tokens": 8},
    })
    result = stages.lightning_opd(config_path=str(config))
    assert list(result) == ["teacher_sft_data", "sft", "rollouts", "teacher_logprobs", "train", "eval"]
    run_dir = tmp_path / "run"
    assert ShardSet.open(run_dir / "teacher_topk").manifest["complete"]
    assert (run_dir / "train" / "final" / "config.json").exists()
    assert json.loads((run_dir / "eval" / "eval.json").read_text())["model"] == str(run_dir / "train" / "final")
    assert not any(r["skipped"] for r in result.values())

    # a rerun is served from the cache: the stored results come back (a stage that ran would say skipped=True)
    assert stages.lightning_opd(config_path=str(config)) == result

    # the train flow's online baseline: a live teacher, its own output dir, the offline run untouched
    offline_metrics = (run_dir / "train" / "metrics.jsonl").read_text()
    online = [f"train.online={{teacher: {tiny_models['teacher']}, prompts: {prompts}, k: 4, "
              f"sampling: {{n: 2, max_new_tokens: 8}}}}"]
    res = stages.train_flow(config_path=str(config), overrides=online, online=True)
    assert res["out"] == str(run_dir / "train_online") and not res["skipped"]
    rows = [json.loads(x) for x in (run_dir / "train_online" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["perf/score_seconds"] > 0
    assert (run_dir / "train" / "metrics.jsonl").read_text() == offline_metrics
    with pytest.raises(ValueError, match="needs a train.online section"):
        stages.train_flow(config_path=str(config), online=True)


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TINY_DEMO = ["demo.digits=2", "demo.train_prompts=16", "demo.opd_prompts=16", "demo.test_prompts=16",
             "demo.teacher_steps=3", "demo.teacher_batch_size=8", "demo.probe_prompts=4", "demo.probe_every=1",
             "demo.max_new_tokens=12", "demo.online_steps_factor=1.0", "teacher_sft_data.sampling.max_new_tokens=12",
             "rollouts.sampling.max_new_tokens=12", "rollouts.sampling.n=1", "sft.steps=2", "sft.batch_size=4",
             "train.steps=2", "train.batch_size=4", "train.checkpoint_every=1", "train.log_every=1",
             "eval.max_new_tokens=12"]


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_demo_flow_runs_each_step_as_a_task_and_equals_the_cli_demo(prefect_api, tmp_path):
    """lightning-opd with demo=True: the world, every step of the demo's plan in order and the report, each a
    task named after the step; the artifacts; and `lopd demo` (no Prefect) on the same run dir runs the same
    steps: it reuses every trained one and reports the same accuracies and times."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    from pipeline.demo.experiment import demo_plan, run_demo

    run_dir = tmp_path / "demo"
    state = stages.lightning_opd(config_path=str(DEMO_CONFIG), overrides=TINY_DEMO, run_dir=str(run_dir), demo=True,
                                 return_state=True)
    report = state.result()
    assert json.loads((run_dir / "demo.json").read_text()) == json.loads(json.dumps(report, default=str))

    async def flow_run_records():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC)
            artifacts = {a.key: a.data for a in await client.read_artifacts()
                         if a.flow_run_id == state.state_details.flow_run_id}
            return [r.name.rsplit("-", 1)[0] for r in runs], artifacts

    task_names, artifacts = asyncio.run(flow_run_records())
    cfg = load_run_config(DEMO_CONFIG, TINY_DEMO, run_dir)
    world = {"prompts": {"test": run_dir / "world/prompts/test.jsonl"},
             "teachers": {s: {"dir": run_dir / f"world/teacher_{s}"} for s in "AB"}}
    steps = list(demo_plan(cfg, world).steps)
    assert steps[:6] == ["teacher_sft_data", "sft", "rollouts", "train_online", "teacher_logprobs", "train_topk"]
    assert task_names == ["world", *steps, "report", "publish_report", "publish_plots"]
    assert artifacts["lopd-report"] == (run_dir / "demo.md").read_text()
    assert "demo_accuracy.png" in artifacts["plots"]
    assert report["reused_stages"] == [] and list(report["wall_seconds"])[3:-1] == steps
    # the published Lightning OPD loss and the SFT-on-OPD-prompts control are rows of their own; only the
    # published loss is called Lightning OPD; the control's teacher answers as many times as the scoring pass
    assert {"topk_opd", "lightning_published", "sft_opd_prompts"} <= set(report["accuracy"]) == set(report["labels"])
    assert [row for row, label in report["labels"].items() if "Lightning OPD" in label] == ["lightning_published"]
    assert report["budgets"]["sft_opd_prompts_teacher_answers"] == report["budgets"]["teacher_scored_rollouts"] > 0
    # the SFT control is a curve of >= 3 teacher budgets; every row carries its teacher and student compute; the
    # break-even against each OPD row; the machine record (threads pinned, deterministic, versions)
    curve = report["sft_curve"]
    assert len(curve) >= 3 and [p["teacher_answers"] for p in curve] == sorted(p["teacher_answers"] for p in curve)
    assert all(report["compute"]["rows"][p["row"]]["teacher_decode_flops"] > 0 for p in curve)
    for row in ("topk_opd", "lightning_published", "online_opd"):
        cost = report["compute"]["rows"][row]
        assert cost["teacher_prefill_flops"] > 0 and cost["teacher_decode_flops"] == 0 and cost["student_flops"] > 0
        assert report["break_even"][row]["where"] in ("below", "within", "above")
    assert report["machine"]["threads"] == 1 and report["machine"]["deterministic"]
    assert {"transformers", "numpy"} <= set(report["machine"]["versions"]) and report["machine"]["cpu_capability"]

    again = run_demo(cfg, show_progress=False, print_table=False)
    trained = [s for s in steps if not s.startswith("eval_")]  # an eval always runs (greedy: same accuracy)
    assert again["reused_stages"] == ["bootstrap_teacher_A", "bootstrap_teacher_B", *trained]
    assert again["accuracy"] == report["accuracy"]
    assert again["time_to_accuracy"] == report["time_to_accuracy"]  # the compute seconds of the first run, kept

    # two worker processes (teachers side by side, then every step once its inputs exist): the same models, byte
    # for byte, as the flow's one-at-a-time run
    run_dir2 = tmp_path / "demo_workers"
    parallel = run_demo(load_run_config(DEMO_CONFIG, [*TINY_DEMO, "demo.workers=2"], run_dir2), show_progress=False,
                        print_table=False)
    assert report["machine"]["workers"] == 1 and parallel["machine"]["workers"] == 2
    assert parallel["reused_stages"] == [] and list(parallel["wall_seconds"])[3:-1] == steps
    assert parallel["accuracy"] == report["accuracy"]
    weights = sorted(p.relative_to(run_dir) for p in run_dir.rglob("model.safetensors") if "ckpt" not in p.parts)
    assert len(weights) == 2 + 2 + 1 + 4 + 1 + 4  # inits, teachers, SFT, OPD rows, SFT continued, the SFT curve
    for rel in weights:
        assert (run_dir2 / rel).read_bytes() == (run_dir / rel).read_bytes(), rel


@pytest.mark.parametrize("runner", ["threads", pytest.param("dask", marks=pytest.mark.integration)])
def test_rollouts_flow_spreads_shards_over_parallel_tasks(prefect_api, tmp_path, tiny_models, runner):
    """num_parts tasks on the chosen task runner (threads; a local Dask cluster of worker processes) write
    disjoint shards; together they equal a one-process run."""
    result = rollouts_in_parts_equal_one_process(tmp_path, tiny_models["student"], runner)
    assert result["skipped"] is True  # the final pass only finds complete shards and writes the manifest


def test_task_runner_choice_and_errors():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    assert isinstance(tasks.make_task_runner("threads", 3), ThreadPoolTaskRunner)
    assert isinstance(tasks.make_task_runner("dask", 2, "tcp://127.0.0.1:8786"), DaskTaskRunner)
    with pytest.raises(ValueError, match="unknown task runner 'slurm'.*threads, dask, ray"):
        tasks.make_task_runner("slurm", 2)
    try:
        import prefect_ray  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install prefect-ray"):
            tasks.make_task_runner("ray", 2)


# --- a real deployment run: local Prefect server, `lopd serve`, `prefect deployment run` ------------------


def _wait_for(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process exited with {proc.returncode} while waiting for {url}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def _stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process group we started; SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_served_deployment_runs_the_eval_stage(tmp_path, eval_config):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect_home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
           "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "HF_HUB_OFFLINE": "1"}
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("server", "serve")}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=logs["server"], stderr=subprocess.STDOUT,
                              start_new_session=True)
    serve = None
    try:
        _wait_for(f"{api}/health", 90, server)
        serve = subprocess.Popen([sys.executable, "-m", "lopd.cli", "serve", "--name", "ci"], env=env, cwd=tmp_path,
                                 stdout=logs["serve"], stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for(f"{api}/deployments/name/eval/ci", 90, serve)

        run_dir = tmp_path / "served_run"
        res = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "eval/ci",
                              "--param", f"config_path={eval_config}", "--param", f"run_dir={run_dir}", "--watch"],
                             env=env, capture_output=True, text=True, timeout=150)
        assert res.returncode == 0, res.stdout + res.stderr + (tmp_path / "serve.log").read_text()

        runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
        assert [r["state_type"] for r in runs] == ["COMPLETED"]
        assert json.loads((run_dir / "eval" / "eval.json").read_text())["greedy"]["samples"] == 6
        artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": ["eval-table"]}}},
                               timeout=10).json()
        assert artifacts and "| model |" in artifacts[0]["data"]
    finally:
        if serve is not None:
            _stop(serve)  # the serving process first, or the server hangs on shutdown
        _stop(server)
        for f in logs.values():
            f.close()
    assert serve.returncode is not None and server.returncode is not None
