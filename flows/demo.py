"""``lopd demo --prefect``: the demo as one run of the ``lightning-opd`` flow (demo=True), each step a task."""

from __future__ import annotations

from typing import Any

from flows.stages import lightning_opd


def demo_flow(config_path: str, run_dir: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the demo through Prefect (a temporary local API is started if PREFECT_API_URL is unset)."""
    return lightning_opd(config_path=config_path, overrides=overrides, run_dir=run_dir, demo=True)
