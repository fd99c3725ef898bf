"""Ray: Prefect's Ray task runner (prefect-ray) spreads a stage's shard parts over a local Ray cluster the test
starts itself (2 CPUs on 127.0.0.1); the shards equal a one-process run."""

from __future__ import annotations

import pytest

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


def test_rollouts_flow_on_a_ray_cluster_equals_one_process(ray_cluster, prefect_api, tmp_path, tiny_models):
    rollouts_in_parts_equal_one_process(tmp_path, tiny_models["student"], "ray")
