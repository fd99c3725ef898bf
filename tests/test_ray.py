"""Ray: Prefect's Ray task runner (prefect-ray) spreads a stage's shard parts over a local Ray cluster the test
starts itself (2 CPUs on 127.0.0.1); the shards equal a one-process run."""

from __future__ import annotations

import pytest

from flows import stages
from pipeline.config import load_run_config
from pipeline.stages.registry import run_stage
from storage.shardset import ShardSet
from tests.test_flows import prefect_api, write_prompts, write_run_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A Ray instance owned by this process (head and workers stop with ray.shutdown); the task runner finds
    it initialised and uses it, as it would join ``address=ray://head:10001`` on a real cluster."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("prefect_ray")
    ctx = ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")),
                   configure_logging=False, log_to_driver=False)
    yield ctx
    ray.shutdown()


def test_rollouts_flow_on_a_ray_cluster_equals_one_process(ray_cluster, prefect_api, tmp_path, tiny_models):  # noqa: F811
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=8)
    config = write_run_config(tmp_path, {"rollouts": {
        "prompts": str(prompts), "student": str(tiny_models["student"]), "prompts_per_shard": 2,
        "sampling": {"n": 2, "max_new_tokens": 6}}})
    result = stages.rollouts_flow(config_path=str(config), num_parts=2, runner="ray")
    assert sorted(p["shards_written"] for p in result["parts"]) == [2, 2]
    spread = ShardSet.open(tmp_path / "run" / "rollouts")
    assert spread.manifest["complete"] and spread.complete_indices() == [0, 1, 2, 3]
    single = load_run_config(config, [f"rollouts.out={tmp_path / 'single'}"]).stage("rollouts")
    run_stage("rollouts", single, show_progress=False)
    for i in range(4):
        assert spread.read_shard(i).equals(ShardSet.open(tmp_path / "single").read_shard(i))
