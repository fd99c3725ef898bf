"""``lopd serve``: register and serve ``lightning-opd/<name>`` and ``<stage>/<name>`` for every stage.

The deployment named ``demo`` runs the demo (``demo=true``) of ``configs/demo.yaml``; any other name runs the
stage chain of the run config given as ``--param config_path=...``. Flow runs execute in subprocesses of the
serving process, in its working directory, at most ``limit`` at a time.
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from flows.stages import STAGE_FLOWS, lightning_opd

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def deployments(name: str = "demo") -> list[RunnerDeployment]:
    """The deployments ``serve_all`` serves; entry points are module paths, so any working directory works."""
    params = {"config_path": str(DEMO_CONFIG)}
    main = lightning_opd.to_deployment(name=name, parameters={**params, "demo": name == "demo"},
                                       entrypoint_type=EntrypointType.MODULE_PATH, tags=["lopd"])
    return [main, *(f.to_deployment(name=name, parameters=params, entrypoint_type=EntrypointType.MODULE_PATH,
                                    tags=["lopd"]) for f in STAGE_FLOWS.values())]


def serve_all(name: str = "demo", limit: int = 1) -> None:
    """Register the deployments with the Prefect API (PREFECT_API_URL) and execute their runs until stopped."""
    serve(*deployments(name), limit=limit)
